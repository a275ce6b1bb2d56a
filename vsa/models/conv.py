"""A depthwise 3D convolution whose backward is fast on the CPU.

PyTorch's CPU backward of a depthwise `Conv3d` (groups = channels) takes a slow generic path:
for the default run's MLP convolution (256 channels, 3x3x3, batch 4 of an 8x16x16 token grid) it
costs 55 ms against 3 ms for the forward (torch 2.13, 2-core CPU). Its two parts map onto fast
oneDNN kernels instead (18 ms together), which takes the default run's training step from 254 to
200 ms (docs/training.md):
- grad_input is the same depthwise convolution of the output gradient with the kernel flipped
  (stride 1, "same" padding): 2-3 ms;
- grad_weight, one kernel time-slice at a time, is the weight gradient of a depthwise 2D
  convolution over all frames (the input shifted in time): ~15 ms for the three slices.
On other devices, and under CPU autocast or mixed dtypes, `DepthwiseConv3d` is a plain
`nn.Conv3d` (cuDNN's or torch's own backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vsa.layout import int_triple


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, C] (contiguous) -> [B*T, C, H, W] with channels-last strides (a view)."""
    b, t, h, w, c = x.shape
    return x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)


class _DepthwiseConv3dFn(torch.autograd.Function):
    """y = conv3d(x, weight, bias, stride 1, padding k // 2, groups = channels), odd k."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        pad = [k // 2 for k in weight.shape[2:]]
        ctx.save_for_backward(x, weight)
        return F.conv3d(x, weight, bias, padding=pad, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        channels, kt = weight.shape[0], weight.shape[2]
        pad = [k // 2 for k in weight.shape[2:]]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=pad, groups=channels)
        if ctx.needs_input_grad[1]:
            t = x.shape[2]
            g = _frames(grad.permute(0, 2, 3, 4, 1).contiguous())
            # x in [B, T, H, W, C] memory order, zero-padded in time: slice a is the input seen by
            # the kernel's time tap a.
            xp = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, 0, 0, 0, 0, pad[0], pad[0]))
            taps = [torch.ops.aten.convolution_backward(
                        g, _frames(xp[:, a:a + t]), weight[:, :, a], None, [1, 1],
                        pad[1:], [1, 1], False, [0, 0], channels, [False, True, False])[1]
                    for a in range(kt)]
            grad_w = torch.stack(taps, dim=2)
        if ctx.needs_input_grad[2]:  # False without a bias
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b


class DepthwiseConv3d(nn.Conv3d):
    """`nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)`
    (same parameters and state dict; `kernel_size` one odd int or (t, h, w)) with a fast backward
    on the CPU (module docstring)."""

    def __init__(self, channels: int, kernel_size: int | tuple[int, int, int], bias: bool = True):
        kernel = int_triple("kernel_size", kernel_size, scalar=True)
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel_size must be odd and positive (a 'same' convolution), one int or "
                             f"(t, h, w), got {kernel_size}")
        super().__init__(channels, channels, kernel, padding=tuple(k // 2 for k in kernel), groups=channels,
                         bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not torch.is_grad_enabled() or x.dtype != self.weight.dtype
                or torch.is_autocast_enabled("cpu")):
            return super().forward(x)  # torch's own backward: other devices, mixed dtypes
        return _DepthwiseConv3dFn.apply(x, self.weight, self.bias)
