"""Export a Wan VSA finetune (a train.py checkpoint of experiment=wan_vsa_finetune) to diffusers.

    python scripts/export_wan.py logs/train/runs/wan_vsa_finetune+... out/wan_vsa

writes `out/wan_vsa/` = the transformer's `save_pretrained` files (config.json,
diffusion_pytorch_model*.safetensors: loadable with `WanTransformer3DModel.from_pretrained`) plus
VSA's trained gates and settings (vsa_gates.safetensors, vsa_attention.json), which
`vsa.integrations.diffusers.load_sparse_attention(transformer, folder)` installs. EMA weights when
the checkpoint has them (--raw: the trained weights as they are). docs/wan.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import vsa  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsa.checkpoint import CHECKPOINT_KEY, model_from_checkpoint, read_checkpoint
from vsa.models.wan import WanVideoModel, is_wan_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder of train.py, or its checkpoints/*.ckpt")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--raw", action="store_true", help="the trained weights, not their EMA")
    return p.parse_args(argv)


def export(checkpoint_path: str | Path, out: str | Path, ema: bool = True) -> Path:
    """Write the checkpoint's Wan transformer (+ VSA gates) as a diffusers folder; return it."""
    checkpoint = read_checkpoint(checkpoint_path)
    if not is_wan_config(checkpoint[CHECKPOINT_KEY]["dit_config"]):
        raise ValueError(f"{checkpoint_path} holds a VideoDiT, not a Wan finetune (experiment=wan_vsa_finetune)")
    model = model_from_checkpoint(checkpoint, ema=ema)
    assert isinstance(model, WanVideoModel)
    return model.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folder = export(args.checkpoint, args.out, ema=not args.raw)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
