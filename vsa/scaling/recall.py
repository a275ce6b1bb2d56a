"""Attention recall: how much of full attention's probability mass a tile selection keeps.

The VSA paper's diagnostic: for a trained model, per layer and diffusion time, the share of the
full softmax attention mass that falls inside the K key tiles VSA's coarse stage selects (the paper:
top-32 of 256 tiles recover >= 60%, up to 90%; 32 random tiles 8%), next to static patterns (sliding
tiles, GRAT) and a random-K baseline.

For one layer with q, k [B, S, H, D] exactly as its attention backend receives them (after
qk-RMSNorm and RoPE, tile-major order), full attention is P = softmax(q k^T / sqrt(D)). The recall
of a tile selection is the mean over query tokens of the mass P puts on the key tiles selected for
the query's tile:

    recall = 1/S * sum_i sum_{j in tiles selected for tile(i)} P[i, j]

Everything goes through the per-tile mass M[qt, kt] = sum over the query tokens of tile qt of P on
the keys of tile kt (`tile_attention_mass`, [B, H, n_tiles, n_tiles]), computed a chunk of query
rows at a time (never the S x S matrix), so that each pattern's recall is one masked sum of M.

Patterns (`parse_pattern`, spec `name[@sparsity][:key=value]...`):
- `vsa`: the top-K key tiles by coarse score, chosen by the op's own function
  (`vsa.ops.select_key_tiles`, as `video_sparse_attention` selects). K: the spec's
  (`vsa@0.875`, `vsa:topk=32`), else the model's own (its sparsity / topk), else sparsity 0.875.
  For a model trained with full attention this is "what VSA would have kept".
- `random`: K distinct random key tiles per query tile and head (K as for vsa); recall ~ K/n_tiles.
- `grat_b`, `grat_x`, `sta` (options as `vsa.ops.patterns`, e.g. `sta:window=2x4x4`), or the name
  of an attention config (configs/attention/NAME.yaml) of one of these or of vsa: `sta32`, `vsa75`.

    python -m vsa.scaling.recall logs/train/runs/vsa_60m --patterns vsa,sta32,grat_b,random
    # -> <run>/recall/recall.json, recall.png and a table on stdout
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vsa.attention import AttentionContext
from vsa.diffusion import interpolate, validation_noise
from vsa.layout import TileLayout
from vsa.models import VideoDiT
from vsa.ops import patterns as static_patterns
from vsa.ops import resolve_topk, select_key_tiles

ATTENTION_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "attention"
DEFAULT_SPARSITY = 0.875  # VSA's K for a model that has none (configs/attention/vsa.yaml)
DEFAULT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_PATTERNS = ("vsa", "sta32", "grat_b", "random")


# --------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecallPattern:
    """A tile selection to measure: `kind` "vsa", "random" or a static pattern name of
    `vsa.ops.patterns` ("grat_b", "grat_x", "sta") with its `options`; `sparsity` / `topk` fix K
    for vsa and random (None: the model's, else DEFAULT_SPARSITY)."""

    label: str
    kind: str
    options: tuple = ()
    sparsity: float | None = None
    topk: int | None = None


def _attention_config(name: str) -> dict | None:
    """configs/attention/NAME.yaml with its defaults list merged in (None if there is none)."""
    path = ATTENTION_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in node.get("defaults", ["_self_"]):
        if entry == "_self_":
            merged = OmegaConf.merge(merged, {k: v for k, v in node.items() if k != "defaults"})
        else:
            merged = OmegaConf.merge(merged, _attention_config(str(entry)) or {})
    return OmegaConf.to_container(merged, resolve=True)


def parse_pattern(text: str) -> RecallPattern:
    """Read a spec `name[@sparsity][:key=value]...` (see the module docstring), e.g. "vsa",
    "vsa@0.75", "vsa:topk=16", "random", "sta32", "sta:window=2x4x4", "grat_b:radius=1"."""
    from vsa.attention.spec import parse_pattern as parse_backend_spec

    known = "vsa, random, grat_b, grat_x, sta or an attention config such as sta32"
    label = text.strip()
    head, sep, rest = label.partition(":")
    name, at, sparsity = head.partition("@")
    name = name.strip()
    base: dict = {"name": name, "options": {}, "sparsity": None, "topk": None}
    if name not in ("vsa", "random", *static_patterns.DEFAULT_OPTIONS):
        config = _attention_config(name)
        if config is None or config.get("name") not in ("vsa", *static_patterns.DEFAULT_OPTIONS):
            raise ValueError(f"unknown pattern {label!r}; use {known} (spec name[@sparsity]"
                             "[:key=value]..., e.g. vsa@0.875 or sta:window=2x4x4)")
        base = {"name": config["name"], "options": dict(config.get("options") or {}),
                "sparsity": config.get("sparsity"), "topk": config.get("topk")}
    kind = base["name"]
    if kind == "vsa":
        base["options"] = {}  # gate options do not change the selection
    # The syntax is the pattern comparison's; random reads K like vsa.
    spec = parse_backend_spec(("vsa" if kind == "random" else kind) + at + sparsity + sep + rest)
    if spec.tile is not None:
        raise ValueError(f"pattern {label!r}: the tile is the checkpoint's; drop tile=")
    if kind in ("vsa", "random"):
        if spec.options:
            raise ValueError(f"pattern {label!r}: {kind} takes only a sparsity (@0.875) or topk=K, "
                             f"not {sorted(spec.options)}")
        if spec.sparsity is not None or spec.topk is not None:
            base["sparsity"], base["topk"] = spec.sparsity, spec.topk
        if base["topk"] is not None:
            base["sparsity"] = None
        if base["topk"] is not None or base["sparsity"] is not None:
            try:
                resolve_topk(1, base["topk"], base["sparsity"])  # checks the values now
            except ValueError as err:
                raise ValueError(f"pattern {label!r}: {err}") from None
        return RecallPattern(label, kind, (), base["sparsity"], base["topk"])
    try:
        options = static_patterns.pattern_options(kind, **{**base["options"], **spec.options})
    except (TypeError, ValueError) as err:
        raise ValueError(f"pattern {label!r}: {err}") from None
    return RecallPattern(label, kind, tuple(sorted(options.items())))


def pattern_topk(pattern: RecallPattern, n_tiles: int, ctx: AttentionContext | None = None) -> int:
    """K of a vsa / random pattern on `n_tiles` tiles: its own sparsity / topk, else the model's
    (from the attention context), else DEFAULT_SPARSITY."""
    if pattern.topk is not None or pattern.sparsity is not None:
        return resolve_topk(n_tiles, pattern.topk, pattern.sparsity)
    if ctx is not None and ctx.topk is not None:
        return resolve_topk(n_tiles, ctx.topk)
    if ctx is not None and ctx.sparsity is not None:
        return resolve_topk(n_tiles, sparsity=ctx.sparsity)
    return resolve_topk(n_tiles, sparsity=DEFAULT_SPARSITY)


def vsa_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout,
                  topk: int) -> torch.Tensor:
    """The key tiles VSA attends to, int32 [B, H, n_tiles, topk]: the op's own selection
    (`vsa.ops.select_key_tiles`, on the Triton kernels for CUDA tensors)."""
    return select_key_tiles(q, k, v, layout, topk=topk)[0]


def selection_mask(pattern: RecallPattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   ctx: AttentionContext, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean [B or 1, H or 1, n_tiles, n_tiles]: True where the pattern keeps key tile kt for
    query tile qt. `generator` (a CPU generator) draws the random tiles."""
    layout = ctx.layout
    n = layout.n_tiles
    if pattern.kind == "vsa":
        idx = vsa_selection(q, k, v, layout, pattern_topk(pattern, n, ctx))
        return static_patterns.tile_mask(idx, torch.full(idx.shape[:3], idx.shape[-1],
                                                         device=idx.device), n)
    if pattern.kind == "random":
        topk = pattern_topk(pattern, n, ctx)
        B, _, H, _ = q.shape
        order = torch.rand(B, H, n, n, generator=generator).argsort(dim=-1)
        return (order < topk).to(q.device)  # a uniform random K-subset per row
    cpu_layout = layout.to("cpu")
    static_patterns.check_layout(cpu_layout)
    idx, cnt = static_patterns.build_map(pattern.kind, cpu_layout, **dict(pattern.options))
    return static_patterns.tile_mask(idx, cnt, n)[None, None].to(q.device)


# --------------------------------------------------------------------------------------------------
# Attention mass per tile pair
# --------------------------------------------------------------------------------------------------


def tile_attention_mass(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                        chunk: int = 1024) -> torch.Tensor:
    """M [B, H, n_tiles, n_tiles] (float64): the full softmax attention mass that the query tokens
    of tile qt put on the keys of tile kt, summed over those query tokens (so a row of M sums to
    the query tile's size and all of M to S).

    q, k: [B, S, H, D] in the tile-major order of `layout`. Scores and softmax in fp32 (float64
    for float64 inputs), `chunk` query rows at a time: memory B * H * chunk * S, never S x S.
    """
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must share one shape [B, S, H, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, S, H, D = q.shape
    if S != layout.seq_len:
        raise ValueError(f"q has {S} tokens but the layout {layout.grid} has {layout.seq_len}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 query rows, got {chunk}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = layout.to(q.device)
    n = layout.n_tiles
    # Query side: tile membership one-hot [S, n], so summing a chunk's rows per tile is a matmul.
    member = torch.nn.functional.one_hot(layout.tile_ids, n).to(dtype)
    keys = k.to(dtype).permute(0, 2, 3, 1)  # [B, H, D, S]
    scale = 1.0 / math.sqrt(D)
    mass = torch.zeros(B, H, n, n, dtype=torch.float64, device=q.device)
    for start in range(0, S, chunk):
        rows = q[:, start:start + chunk].to(dtype).transpose(1, 2)  # [B, H, c, D]
        probs = torch.softmax((rows @ keys) * scale, dim=-1)        # [B, H, c, S]
        if layout.fill == 2:  # every tile full: the keys of a tile are a run of tile_volume
            per_key_tile = probs.unflatten(-1, (n, layout.tile_volume)).sum(-1)
        else:
            per_key_tile = probs.new_zeros(*probs.shape[:-1], n).index_add_(-1, layout.tile_ids, probs)
        mass += (member[start:start + chunk].T @ per_key_tile).double()  # [B, H, n, n]
    return mass


def recall_from_mass(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Recall [B, H] of a selection `mask` (broadcastable to `mass` [B, H, n, n]): the kept share
    of the mass, i.e. the mean over query tokens of the attention they put on their kept tiles."""
    return (mass * mask).sum(dim=(-2, -1)) / mass.sum(dim=(-2, -1))


def kept_share(mask: torch.Tensor, layout: TileLayout) -> float:
    """Mean over query tokens (and batch, heads) of the share of key tokens a mask keeps: the
    recall of uniform attention, what a random pick of the same tiles recovers on average."""
    sizes = layout.sizes.to(device=mask.device, dtype=torch.float64)
    kept_keys = mask.double() @ sizes                                # [.., n]: keys kept per q tile
    return float((kept_keys * sizes).sum(-1).mean()) / layout.seq_len ** 2


# --------------------------------------------------------------------------------------------------
# Through a model
# --------------------------------------------------------------------------------------------------


@contextmanager
def attention_inputs(model: VideoDiT, callback):
    """Call `callback(layer, q, k, v, ctx)` with each block's attention inputs, as its backend
    receives them (a forward pre-hook on every backend; the forward itself is unchanged)."""
    handles = []
    for layer, block in enumerate(model.blocks):
        def hook(module, args, layer=layer):
            callback(layer, *args)
        handles.append(block.attn.backend.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_recall(model: VideoDiT, x0: torch.Tensor, cond: dict | None = None,
                     timesteps: Sequence[float] = DEFAULT_TIMESTEPS,
                     patterns: Sequence[str | RecallPattern] = DEFAULT_PATTERNS, chunk: int = 1024,
                     batch_size: int | None = None, seed: int = 0) -> dict:
    """Recall of each pattern per layer and diffusion time on clips `x0` [N, C, T, H, W].

    At each time t the model (eval mode) runs on x_t = interpolate(x0, noise, t) with `cond`
    (model keyword arguments batched like x0, e.g. labels) and the validation protocol's fixed noise
    (`validation_noise(shape, seed, index of t)`), `batch_size` clips at a time; every layer's q, k
    are taken as its backend receives them. Returns a JSON-ready dict: "recall" and "kept"
    {pattern: [time][layer]} (means over clips and heads), "recall_per_head" {pattern:
    [time][layer][head]} (means over clips), and the set-up (times, token grid, tiles, K).
    """
    specs = [p if isinstance(p, RecallPattern) else parse_pattern(p) for p in patterns]
    if not specs:
        raise ValueError("no patterns given; e.g. vsa, sta32, grat_b, random")
    times = [float(t) for t in timesteps]
    if not times or any(not 0.0 <= t <= 1.0 for t in times):
        raise ValueError(f"timesteps must be times in [0, 1], got {list(timesteps)}")
    cond = cond or {}
    param = next(model.parameters())
    x0 = x0.to(device=param.device, dtype=param.dtype)
    cond = {k: None if v is None else v.to(param.device) for k, v in cond.items()}
    batch_size = batch_size or x0.shape[0]
    n_layers, n_heads = len(model.blocks), model.cfg.n_heads
    shape = (len(specs), len(times), n_layers)
    recall_sum = torch.zeros(*shape, n_heads, dtype=torch.float64)  # summed over clips
    kept_sum = torch.zeros(shape, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    info: dict = {}
    state = {"time": 0}

    def measure(layer, q, k, v, ctx):
        mass = tile_attention_mass(q, k, ctx.layout, chunk)
        for p, spec in enumerate(specs):
            mask = selection_mask(spec, q, k, v, ctx, generator)
            recall_sum[p, state["time"], layer] += recall_from_mass(mass, mask).sum(0).cpu()
            kept_sum[p, state["time"], layer] += kept_share(mask, ctx.layout) * q.shape[0]
            if spec.kind in ("vsa", "random"):
                info.setdefault("topk", {})[spec.label] = pattern_topk(spec, ctx.layout.n_tiles, ctx)
        info.update(grid=list(ctx.layout.grid), tile=list(ctx.layout.tile),
                    n_tiles=ctx.layout.n_tiles, tokens=ctx.layout.seq_len)

    was_training = model.training
    model.eval()
    try:
        with attention_inputs(model, measure):
            for index, t_value in enumerate(times):
                state["time"] = index
                noise = validation_noise(x0.shape, seed, index).to(x0)
                for start in range(0, x0.shape[0], batch_size):
                    clips = x0[start:start + batch_size]
                    t = torch.full((clips.shape[0],), t_value, device=x0.device)
                    model(interpolate(clips, noise[start:start + batch_size], t), t,
                          **{k: None if v is None else v[start:start + batch_size]
                             for k, v in cond.items()})
    finally:
        model.train(was_training)
    recall = recall_sum / x0.shape[0]
    kept = kept_sum / x0.shape[0]
    return {
        "timesteps": times,
        "patterns": [s.label for s in specs],
        "layers": n_layers,
        "heads": n_heads,
        "clips": int(x0.shape[0]),
        "seed": seed,
        "attention": model.cfg.attention,
        **info,
        "recall": {s.label: recall[p].mean(-1).tolist() for p, s in enumerate(specs)},
        "kept": {s.label: kept[p].tolist() for p, s in enumerate(specs)},
        "recall_per_head": {s.label: recall[p].tolist() for p, s in enumerate(specs)},
    }


# --------------------------------------------------------------------------------------------------
# Report: table, plot, command line
# --------------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """One row per (pattern, time): recall per layer and the mean over layers, and the kept share
    of keys (the recall of uniform attention)."""
    layers = result["layers"]
    head = ["pattern", "t", *[f"L{i}" for i in range(layers)], "mean", "kept"]
    rows = []
    for label in result["patterns"]:
        for t, values, kept in zip(result["timesteps"], result["recall"][label], result["kept"][label]):
            rows.append([label, f"{t:g}", *[f"{v:.3f}" for v in values],
                         f"{sum(values) / len(values):.3f}", f"{sum(kept) / len(kept):.3f}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths))) for r in [head, *rows])


def plot_recall(result: dict, path: str | Path) -> Path:
    """recall.png: one panel per pattern, recall vs layer, one line per diffusion time; the dashed
    line is the kept share of keys (what uniform attention would give)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = result["patterns"]
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows + 0.4), squeeze=False,
                             sharey=True)
    layers = list(range(result["layers"]))
    colors = plt.cm.viridis([i / max(1, len(result["timesteps"]) - 1)
                             for i in range(len(result["timesteps"]))])
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, labels):
        for color, t, values in zip(colors, result["timesteps"], result["recall"][label]):
            ax.plot(layers, values, marker="o", ms=3, color=color, label=f"t={t:g}")
        kept = result["kept"][label]
        ax.plot(layers, [sum(col) / len(col) for col in zip(*kept)], ls="--", color="grey",
                label="kept keys")
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("attention mass recalled")
    axes.flat[len(labels) - 1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"attention recall ({result['attention']} model, {result.get('tokens')} tokens, "
                 f"{result.get('n_tiles')} tiles)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_out(ckpt: Path) -> Path:
    """<run folder>/recall for <run>/checkpoints/X.ckpt, else a recall folder beside the file."""
    parent = ckpt.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "recall"


def recall_report(path: str | Path, timesteps: Sequence[float] = DEFAULT_TIMESTEPS,
                  patterns: Sequence[str] = DEFAULT_PATTERNS, clips: int = 4,
                  data_config: str | Path | None = None, out: str | Path | None = None,
                  chunk: int = 1024, batch_size: int = 1, seed: int = 0, ema: bool = True,
                  device: str | None = None) -> dict:
    """Recall of a checkpoint (file or run folder) on `clips` validation clips of its training
    data (`data_config`: None = the run's .hydra/config.yaml); writes recall.json and recall.png
    to `out` (default <run>/recall) and returns the result."""
    from vsa.checkpoint import find_checkpoint, find_data_config, model_from_checkpoint, read_checkpoint
    from vsa.training.validation_data import validation_batches

    specs = [parse_pattern(p) for p in patterns]  # bad specs fail before anything loads
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    ckpt = find_checkpoint(path)
    checkpoint = read_checkpoint(ckpt)
    if data_config is None:
        data_config = find_data_config(ckpt)
        if data_config is None:
            raise FileNotFoundError(f"no training config beside {ckpt} (<run>/.hydra/config.yaml) "
                                    "to find its validation clips; pass --data-config FILE")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches, _ = validation_batches(checkpoint, data_config, device, max_batches=clips)
    x0 = torch.cat([x for x, _ in batches])[:clips]
    keys = batches[0][1].keys()
    cond = {k: None if batches[0][1][k] is None else torch.cat([c[k] for _, c in batches])[:clips]
            for k in keys}
    model = model_from_checkpoint(checkpoint, ema, device)
    result = attention_recall(model, x0, cond, timesteps, specs, chunk, batch_size, seed)
    result = {"checkpoint": str(ckpt), "data_config": str(data_config), **result}
    out = Path(out) if out is not None else default_out(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_recall(result, out / "recall.png")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vsa.scaling.recall",
        description="Share of full attention's probability mass inside the tiles VSA selects and "
                    "inside static / random patterns, per layer and diffusion time.")
    parser.add_argument("checkpoint", help="a run folder of train.py or a .ckpt file")
    parser.add_argument("--timesteps", type=float, nargs="+", default=list(DEFAULT_TIMESTEPS))
    parser.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS),
                        help="comma-separated specs name[@sparsity][:key=value] (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=4, help="validation clips (default: 4)")
    parser.add_argument("--data-config", help="train config with the data section (default: the "
                        "run's .hydra/config.yaml)")
    parser.add_argument("--out", help="output folder (default: <run>/recall)")
    parser.add_argument("--chunk", type=int, default=1024, help="query rows per step (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per forward (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="noise and random-tile seed")
    parser.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        result = recall_report(
            args.checkpoint, args.timesteps, [p for p in args.patterns.split(",") if p.strip()],
            args.clips, args.data_config, args.out, args.chunk, args.batch_size, args.seed,
            not args.no_ema, args.device)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        message = str(err).strip("'\"")
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(format_table(result))
    out = Path(args.out) if args.out else default_out(Path(result["checkpoint"]))
    print(f"wrote {out / 'recall.json'} and {out / 'recall.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
