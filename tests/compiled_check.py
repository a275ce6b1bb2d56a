"""The check shared by the compile_blocks tests of VideoDiT and of the Wan model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def assert_compiled_matches_eager(eager: nn.Module, compiled: nn.Module,
                                  forward: Callable[[nn.Module], torch.Tensor]) -> None:
    """`compiled` (a copy of `eager` after compile_blocks) keeps the state dict's names, the
    outputs of `forward(model)` (eval mode) and the gradients of their mean square, parameter by
    parameter (those without a gradient in one have none in the other)."""
    assert compiled.blocks_compiled and list(compiled.state_dict()) == list(eager.state_dict())
    outs = []
    for model in (eager, compiled):
        model.eval()
        out = forward(model)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5)
