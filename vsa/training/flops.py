"""Analytic FLOPs per sample of a VideoDiT (docs/design.md, "FLOP accounting").

One multiply-add = 2 FLOPs; training = 3 x forward (activation recomputation not counted).

    linear          2 * params_per_token * L       matmul weights applied to each of the L video
                                                   tokens (biases are adds, not multiply-adds)
    self_attention  depth * 4 * L * L_kv_eff * d   d = width; L_kv_eff = L (full) or K * 64 (VSA,
                    (+ depth * 4 * (L/64)^2 * d    K = ceil((1 - sparsity) * n_tiles) clamped to
                     for VSA's coarse stage)       [1, n_tiles], or K = topk); each backend gives
                                                   its own (`AttentionBackend.kv_tokens`,
                                                   `coarse_flops`, `gate_weights`)
    cross_attention depth * 4 * L * L_txt * d
    conditioning    the small per-sample and per-text-token matmuls outside the formula above:
                    the timestep MLP (256*d + d^2), the adaLN-single MLP (6 d^2), and for text
                    models the text projection (text_dim*d + d^2) and each block's text k/v
                    projection (2 d^2) per text token. Counted so the total equals what
                    torch.utils.flop_counter.FlopCounterMode measures on the model's forward.

Everything else (norms, RoPE, softmax, modulation, gating, GELU) is elementwise and not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vsa.attention import BACKENDS, AttentionBackend
from vsa.models.config import DiTConfig, check_sparsity
from vsa.models.dit import TIMESTEP_FREQ_DIM


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one sample's forward pass, by term (see the module docstring)."""

    linear: float
    self_attention: float
    cross_attention: float
    conditioning: float
    params_per_token: int  # matmul weights applied to every video token
    tokens: int  # L
    kv_tokens: int  # L_kv_eff of the self-attention

    @property
    def forward(self) -> float:
        return self.linear + self.self_attention + self.cross_attention + self.conditioning

    @property
    def training(self) -> float:
        """Forward + backward, counted as 3 x forward."""
        return 3.0 * self.forward


def _backend(cfg: DiTConfig) -> type[AttentionBackend]:
    if cfg.attention not in BACKENDS:
        raise ValueError(f"no FLOP formula for attention backend {cfg.attention!r}; registered "
                         f"backends: {sorted(BACKENDS)}")
    return BACKENDS[cfg.attention]


def forward_flops(cfg: DiTConfig, video_shape, text_len: int = 0, sparsity: float | None = None,
                  topk: int | None = None, attention: str | None = None,
                  attention_options: dict | None = None) -> FlopCount:
    """Forward FLOPs per sample for input `video_shape` = (T, H, W) (before patchify).

    `sparsity` / `topk` override the config's (a schedule changes them during training); for VSA
    an explicit top-k wins over sparsity, as in the model. `attention` (+ `attention_options`,
    default: the backend's defaults) counts the same architecture with another backend.
    """
    if attention is not None:
        cfg = dataclasses.replace(cfg, attention=attention,
                                  attention_options=dict(attention_options or {}))
    grid = cfg.token_grid(video_shape)
    if text_len < 0 or (text_len and not cfg.text_dim):
        raise ValueError(f"text_len={text_len} needs a text model (text_dim > 0) and must be >= 0")
    if cfg.text_dim and text_len < 1:
        raise ValueError(f"this config cross-attends to text (text_dim={cfg.text_dim}); give "
                         "text_len, the number of text tokens per sample")
    w, L, depth = cfg.width, math.prod(grid), cfg.depth
    in_features = cfg.in_channels * cfg.patch_volume
    out_features = cfg.out_channels * cfg.patch_volume

    backend = _backend(cfg)
    # qkv + out, MLP, the backend's own projections (VSA's gates)
    per_block = 4 * w * w + 2 * w * cfg.mlp_width + backend.gate_weights(w, **cfg.attention_options)
    if cfg.mlp_conv_kernel:  # depthwise token convolution (zero padding counted)
        per_block += cfg.mlp_width * math.prod(cfg.mlp_conv_kernel)
    if cfg.text_dim:
        per_block += 2 * w * w  # cross-attention q and out projections (on video tokens)
    params_per_token = in_features * w + depth * per_block + w * out_features

    if backend.needs_sparsity:
        topk = cfg.topk if topk is None else topk
        sparsity = cfg.sparsity if sparsity is None else sparsity
        check_sparsity(sparsity, topk)
    kv_tokens = backend.kv_tokens(grid, cfg.tile, cfg.tile_order, cfg.attention_options, sparsity, topk)
    coarse = backend.coarse_flops(grid, cfg.tile, w)
    self_attention = depth * (4 * L * kv_tokens * w + coarse)

    conditioning = 2 * (TIMESTEP_FREQ_DIM * w + w * w + 6 * w * w)
    cross_attention = 0.0
    if cfg.text_dim:
        text_weights = cfg.text_dim * w + w * w + depth * 2 * w * w
        conditioning += 2 * text_weights * text_len
        cross_attention = depth * 4 * L * text_len * w

    return FlopCount(linear=2.0 * params_per_token * L, self_attention=float(self_attention),
                     cross_attention=float(cross_attention), conditioning=float(conditioning),
                     params_per_token=params_per_token, tokens=L, kv_tokens=kv_tokens)


def training_flops(cfg: DiTConfig, video_shape, text_len: int = 0, sparsity: float | None = None,
                   topk: int | None = None, attention: str | None = None,
                   attention_options: dict | None = None) -> float:
    """Training FLOPs per sample: 3 x forward."""
    return forward_flops(cfg, video_shape, text_len, sparsity, topk, attention,
                         attention_options).training
