"""GPU evidence for finetuning Wan with VSA (docs/wan.md): dense vs VSA, each pair in one process.

    python scripts/wan_check.py --out docs/results/wan_check_h100.json
    python scripts/wan_check.py --smoke            # a CPU check of this script (tiny sizes)

Two parts (--parts, comma-separated):
  finetune  A ~55M Wan (the real diffusers architecture, random weights, 12 blocks of width 512)
            at 16,384 tokens: the captioned moving shapes (3x16x128x128 -> space-to-depth ->
            12x16x64x64 latents), captions through a random T5 encoder. It first trains dense for
            --pretrain steps (a stand-in for a pretrained model), then from that state twice for
            --steps steps: dense, and VSA with zero-initialised gates on the paper's staircase
            (0 -> 0.875 by 0.125, the target reached at half the run). Held-out loss (16 clips x 4
            fixed times) every --eval-every steps, median step times, and sampling time (50 Euler
            steps with CFG, batch 1).
  1.3b      Wan2.1-T2V-1.3B's architecture (random weights) at 32,760 tokens (81 frames 480x832:
            16x21x60x104 latents): peak memory and median time of a training step (bf16 autocast,
            fp32 master weights, AdamW, activation checkpointing), dense vs VSA 0.875; sampling
            time of 50 Euler steps with CFG (the VSA paper's 31 s -> 18 s point).
--compile compiles the blocks (WanVideoModel.compile_blocks) in both parts. Prints a short table
last; writes everything to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import vsa  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsa.benchmark import run_meta
from vsa.data.codecs import SpaceToDepthCodec
from vsa.data.synthetic import SyntheticVideoDataset
from vsa.data.text import TextEncoder
from vsa.diffusion import flow_matching_loss
from vsa.diffusion.flow import sample_timesteps
from vsa.models.wan import build_wan
from vsa.training.callbacks import SparsitySchedule

# Wan2.1-T2V-1.3B (diffusers' transformer/config.json).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# ~55M: 12 blocks of width 512 (4 heads of 128), the 1.3B's layout otherwise; 12 latent channels.
WAN_SMALL = dict(WAN_1_3B, num_attention_heads=4, ffn_dim=2048, num_layers=12, in_channels=12,
                 out_channels=12, text_dim=256)
SHIFT = 3.0  # Wan's flow shift at 480p


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sample_seconds(model, shape, text, steps: int, device) -> float:
    """Wall time of `steps` Euler steps with classifier-free guidance (cond + null text in one
    batch of 2, as diffusers' pipeline), batch 1, no grad, after one untimed model call."""
    model.eval()
    x = torch.randn(1, *shape, device=device)
    both = torch.cat([text, torch.zeros_like(text)])
    with torch.no_grad(), autocast(device):  # warm-up, not timed: compilation, autotuning
        model(torch.cat([x, x]), torch.ones(2, device=device), text=both)
    sync()
    start = time.perf_counter()
    with torch.no_grad(), autocast(device):
        for i in range(steps):
            t = torch.full((2,), 1.0 - i / steps, device=device)
            v_cond, v_null = model(torch.cat([x, x]), t, text=both).float().chunk(2)
            x = x - (v_null + 5.0 * (v_cond - v_null)) / steps
    sync()
    model.train()
    return time.perf_counter() - start


def train_steps(model, batches, steps: int, device, schedule=None, eval_fn=None, eval_every: int = 0,
                lr: float = 3e-4) -> dict:
    """`steps` AdamW steps on `batches(step)`; step times (CUDA-synchronised), eval curve."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    times, curve, losses = [], [], []
    for step in range(steps):
        if schedule is not None:
            model.sparsity = schedule.value(step)
        if eval_fn is not None and eval_every and step % eval_every == 0:
            curve.append({"step": step, "sparsity": model.sparsity, "val_loss": eval_fn()})
        x0, text = batches(step)
        t = sample_timesteps(x0.shape[0], shift=SHIFT, device=device)
        sync()
        start = time.perf_counter()
        with autocast(device):
            loss = flow_matching_loss(model, x0, t, text=text)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    if eval_fn is not None:
        curve.append({"step": steps, "sparsity": model.sparsity, "val_loss": eval_fn()})
    skip = min(3, len(times) - 1)  # the first steps warm up (autotuning, allocator)
    return {"step_time_s": statistics.median(times[skip:]), "train_loss": losses, "curve": curve,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}


def finetune_part(args, device) -> dict:
    frames, size = (4, 32) if args.smoke else (16, 128)
    arch = dict(WAN_SMALL, num_layers=2, text_dim=32) if args.smoke else WAN_SMALL
    tile = (2, 4, 4) if args.smoke else (4, 4, 4)
    data = SyntheticVideoDataset(args.clips + 16, frames=frames, height=size, width=size, seed=0,
                                 captions=True, max_objects=1)
    codec = SpaceToDepthCodec((1, 2, 2))
    encoder = TextEncoder.tiny(dim=arch["text_dim"], max_length=16).to(device)
    items = [data[i] for i in range(len(data))]
    latents = codec.encode(torch.stack([it["video"] for it in items])).to(device)
    text, _ = encoder([it["caption"] for it in items])
    train_x, train_text = latents[:args.clips], text[:args.clips]
    val_x, val_text = latents[args.clips:], text[args.clips:]
    gen = torch.Generator().manual_seed(1)
    val_noise = torch.randn(val_x.shape, generator=gen).to(device)
    val_t = torch.tensor([0.2, 0.4, 0.6, 0.8], device=device)

    def eval_fn(model) -> float:
        model.eval()
        total = 0.0
        with torch.no_grad(), autocast(device):
            for t in val_t:
                for i in range(0, len(val_x), 4):
                    total += float(flow_matching_loss(model, val_x[i:i + 4], t.expand(len(val_x[i:i + 4])),
                                                      noise=val_noise[i:i + 4], text=val_text[i:i + 4]))
        model.train()
        return total / (len(val_t) * ((len(val_x) + 3) // 4))

    def batches(step: int):
        g = torch.Generator().manual_seed(10_000 + step)
        idx = torch.randint(0, args.clips, (args.batch,), generator=g).to(device)
        return train_x[idx], train_text[idx]

    def build(attention: str):
        torch.manual_seed(0)
        model = build_wan(transformer=arch, in_channels=arch["in_channels"], attention=attention, tile=tile,
                          sparsity=0.0, impl="torch" if args.smoke else None).to(device)
        if args.compile:
            model.compile_blocks()
        return model

    dense = build("full")
    pre = train_steps(dense, batches, args.pretrain, device, lr=args.lr)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    out = {"arch": arch, "latent_shape": list(latents.shape[1:]), "tokens": None, "pretrain": {
        "steps": args.pretrain, "val_loss": eval_fn(dense), "step_time_s": pre["step_time_s"]}}
    out["tokens"] = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    interval = max(1, args.steps // 14)  # 7 increments of 0.125: 0.875 at half the run
    for name in ("full", "vsa"):
        model = dense if name == "full" else build("vsa")
        if name == "vsa":
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and all(k.startswith("gates.") for k in missing), (missing, unexpected)
        else:
            model.load_state_dict(state)
        schedule = SparsitySchedule(0.875, 0.125, interval) if name == "vsa" else None
        run = train_steps(model, batches, args.steps, device, schedule, lambda m=model: eval_fn(m),
                          args.eval_every, lr=args.lr)
        if name == "vsa":
            model.sparsity = 0.875
        run["sample_s"] = sample_seconds(model, latents.shape[1:], val_text[:1], args.sample_steps, device)
        out[name] = run
    return out


def big_part(args, device) -> dict:
    arch = dict(WAN_1_3B, num_layers=2, num_attention_heads=2, ffn_dim=256, text_dim=64) if args.smoke else WAN_1_3B
    shape = (16, 3, 8, 12) if args.smoke else (16, 21, 60, 104)
    tile = (2, 4, 4) if args.smoke else (4, 4, 4)
    text = torch.randn(1, 512 if not args.smoke else 8, arch["text_dim"], device=device)
    out = {"arch": arch, "latent_shape": list(shape), "tokens": shape[1] * (shape[2] // 2) * (shape[3] // 2)}
    for name in ("full", "vsa"):
        torch.manual_seed(0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_wan(transformer=arch, in_channels=arch["in_channels"], attention=name, tile=tile,
                          sparsity=0.875, activation_checkpointing=True,
                          impl="torch" if args.smoke else None).to(device)
        if args.compile:
            model.compile_blocks()
        x0 = torch.randn(1, *shape, device=device)
        try:
            run = train_steps(model, lambda step: (x0, text), args.big_steps, device)
            run.pop("curve")
            run["sample_s"] = sample_seconds(model, shape, text, args.sample_steps, device)
        except torch.OutOfMemoryError as exc:
            run = {"error": f"out of memory: {exc}"[:300]}
        out[name] = run
        del model
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="finetune,1.3b")
    ap.add_argument("--clips", type=int, default=256, help="training clips of the finetune part")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pretrain", type=int, default=300, help="dense steps before the finetune")
    ap.add_argument("--steps", type=int, default=300, help="finetune steps (dense and VSA)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--big-steps", type=int, default=6, help="timed training steps of the 1.3B part")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the Wan blocks (module.compile_blocks); the first steps compile")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.clips, args.pretrain, args.steps, args.eval_every, args.big_steps, args.sample_steps = 8, 3, 4, 2, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"args": vars(args)}
    parts = args.parts.split(",")
    results["meta"] = run_meta() if device.type == "cuda" else {"device": "cpu", "torch": torch.__version__}

    def save() -> None:  # after each part: a call stopped at its time limit keeps the parts done
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    if "finetune" in parts:
        results["finetune"] = finetune_part(args, device)
        save()
    if "1.3b" in parts:
        results["1.3b"] = big_part(args, device)
        save()
    print(f"{'part':>9} {'attn':>5} {'tokens':>7} {'step ms':>8} {'mem GB':>7} {'sample s':>9} {'val loss':>9}")
    for part in ("finetune", "1.3b"):
        for name in ("full", "vsa"):
            r = results.get(part, {}).get(name)
            if r is None:
                continue
            if "error" in r:
                print(f"{part:>9} {name:>5} {r['error'][:60]}")
                continue
            val = r["curve"][-1]["val_loss"] if r.get("curve") else float("nan")
            mem = r["peak_memory_gb"] or float("nan")
            print(f"{part:>9} {name:>5} {results[part]['tokens']:>7} {1e3 * r['step_time_s']:>8.1f} {mem:>7.1f} "
                  f"{r['sample_s']:>9.2f} {val:>9.4f}")
    if "finetune" in results:
        print(f"finetune: dense pretrain val loss {results['finetune']['pretrain']['val_loss']:.4f} after "
              f"{args.pretrain} steps; curves in --out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
