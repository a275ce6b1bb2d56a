"""The FSDP units of the models vsa trains: one per transformer block (configs/trainer/fsdp.yaml)."""

from __future__ import annotations

from torch import nn


def fsdp_block_classes() -> set[type[nn.Module]]:
    """The block classes FSDP wraps as one unit each: VideoDiT's `DiTBlock` and, when diffusers is
    installed, Wan's `WanTransformerBlock` (a finetuned diffusers Wan, `vsa.models.wan`)."""
    from vsa.models import DiTBlock

    classes: set[type[nn.Module]] = {DiTBlock}
    try:
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    except ImportError:  # diffusers is optional; without it no Wan model can be built either
        return classes
    classes.add(WanTransformerBlock)
    return classes
