"""The comparison report as markdown: a paragraph of settings and a table, one row per pattern."""

from __future__ import annotations


def _ms(value: float | None) -> str:
    """2 decimals from 1 up, 3 significant digits below (ms or s)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def markdown_report(report: dict) -> str:
    """The comparison as a markdown paragraph (settings) and table (one row per pattern)."""
    s, m = report["settings"], report["model"]
    val = report["validation"]
    lines = [
        f"Checkpoint `{report['checkpoint']}` ({m['params'] / 1e6:.1f}M parameters, trained with "
        f"{m['trained_attention']} attention, tile {'x'.join(map(str, m['trained_tile']))}); "
        f"latents {'x'.join(map(str, report['latent_shape']))} = token grid "
        f"{'x'.join(map(str, report['token_grid']))} ({report['tokens']} tokens). "
        f"{s['num_videos']} videos, {s['steps']} {s['method']} steps, CFG {s['cfg_scale']}, "
        f"seed {s['seed']}, {report['device']}, torch {report['torch']}, precision {s['precision']}, "
        f"{report['date']}.",
        "",
        f"Attention: ms per model evaluation (all {m['depth']} blocks, CFG batch), mean of "
        f"{s['forwards']} after {s['warmup']} warm-up; sampling: median of {s['repeats']} run(s), "
        "decoding included; drift of the decoded videos against "
        f"`{report['reference']}` (same noise and labels); "
        + ("validation loss: not measured." if val is None else
           f"validation loss: the training protocol on {val['samples']} validation samples "
           f"(n_t {val['n_t']}), change against `{report['reference']}` in brackets."),
        "",
        "| pattern | tile | kept | attention ms | attention speedup | sampling s | sampling speedup "
        "| rel. L2 | PSNR dB | val loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        speed = row["attention_speedup"]
        psnr = "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        rel = "0" if row["rel_l2"] == 0 else f"{row['rel_l2']:.2e}"
        loss = "-" if row["val_loss"] is None else (
            f"{row['val_loss']:.4f}" + ("" if row["label"] == report["reference"]
                                        else f" ({row['val_loss_delta']:+.3g})"))
        lines.append(
            f"| {row['label']} | {'x'.join(map(str, row['tile']))} | {100 * row['kept']:.1f}% | "
            f"{_ms(row['attention_ms'])} | {'-' if speed is None else f'{speed:.2f}x'} | "
            f"{_ms(row['sampling_s'])} | {row['sampling_speedup']:.2f}x | {rel} | {psnr} | {loss} |")
    return "\n".join(lines) + "\n"
