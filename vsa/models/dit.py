"""VideoDiT: a Diffusion Transformer over video (or video-latent) tokens.

    x [B, C, T, H, W] -> patchify -> tokens [B, S, C*pt*ph*pw] -> tile-major order (once)
      -> linear patch embedding -> N x DiTBlock -> final adaptive norm + linear
      -> raster order (once) -> unpatchify -> velocity [B, C_out, T, H, W]

Conditioning is adaLN-single (PixArt-alpha): one shared MLP maps the timestep (+ class) embedding
c to six modulation vectors (shift, scale, gate for attention and for the MLP); every block adds
its own learned offsets to them. Gates, offsets, the shared MLP's output layer and the final linear
all start at zero, so at initialisation each block is the identity and the model outputs zero.

Every block's self-attention goes through an attention backend (`vsa.attention`) that sees the
tokens in tile-major order; 3D RoPE angles are permuted into that order with the tokens, so the
model computes the same function whatever the token order (up to floating point).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vsa.attention import AttentionContext, build_backend
from vsa.layout import TileLayout, int_triple
from vsa.models.config import X0_MIN_T, DiTConfig, SparsityKnobs
from vsa.models.conv import DepthwiseConv3d
from vsa.models.rope import apply_rope, rope_angles

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [S, head_dim // 2], tile-major order
TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of `x` [B, S, W] by per-sample `shift`, `scale` [B, W]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM,
                      max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of t in [0, 1] (scaled by 1000, as for discrete-time DiTs)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t [B] -> sinusoidal features -> 2-layer MLP -> [B, width]."""

    def __init__(self, width: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))


class QKNorm(nn.RMSNorm):
    """RMSNorm over the head dim whose weight follows the input's dtype: under bf16 autocast q and k
    come out of the projection in bf16, and nn.RMSNorm with its fp32 weight would then fall back
    from the fused kernel (with a warning at every call). Same parameters and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SelfAttention(nn.Module):
    """qkv projection, qk-RMSNorm, 3D RoPE, attention backend, output projection.

    The backend sees the block's normalised input as ctx.x_norm. When it has a projection of its
    own (VSA's gates, `input_projection()`), that projection runs in the same matmul as qkv, its
    weight stacked under qkv's (one read of x, one launch), and reaches the backend as ctx.x_proj;
    the parameters stay two modules (same state dict)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.q_norm = QKNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = QKNorm(cfg.head_dim, eps=1e-6)
        self.backend = build_backend(cfg.attention, cfg.width, cfg.n_heads, cfg.head_dim,
                                     **cfg.attention_options)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext) -> torch.Tensor:
        extra = self.backend.input_projection()
        if extra is None:
            qkv, x_proj = self.qkv(x), None
        else:
            weight = torch.cat([self.qkv.weight, extra.weight])
            bias = torch.cat([self.qkv.bias, extra.bias])
            qkv, x_proj = F.linear(x, weight, bias).split([self.qkv.out_features, extra.out_features], -1)
        ctx = dataclasses.replace(ctx, x_norm=x, x_proj=x_proj)
        q, k, v = qkv.unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(dim=2)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        o = self.backend(q, k, v, ctx)  # [B, S, H, D]
        return self.proj(o.flatten(2))


class CrossAttention(nn.Module):
    """Dense attention from video tokens to (projected) text tokens, qk-RMSNorm, no RoPE."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.q_norm = QKNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = QKNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None) -> torch.Tensor:
        q = self.q_norm(self.q(x).unflatten(-1, (self.n_heads, self.head_dim)))
        k, v = self.kv(text).unflatten(-1, (2, self.n_heads, self.head_dim)).unbind(dim=2)
        k = self.k_norm(k)
        mask = None if text_mask is None else text_mask[:, None, None, :]  # [B, 1, 1, L_txt]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)
        return self.proj(o.transpose(1, 2).flatten(2))


def compile_in_place(blocks: Sequence[nn.Module], **options) -> dict:
    """torch.compile every module of `blocks` in place (`nn.Module.compile`); return the options
    used: `options` over the defaults fullgraph=True (a graph break in a block is a bug) and
    dynamic=False (one graph per input shape)."""
    options = {"fullgraph": True, "dynamic": False, **options}
    # All blocks share one code object, whose compiled graphs dynamo caches up to a limit (8 by
    # default): train/eval, recomputation, other shapes, other models in the same process each
    # need their own. Past the limit a fullgraph compile fails, so raise it.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    for block in blocks:
        block.compile(**options)
    return options


class MLP(nn.Module):
    """fc1 -> GELU -> fc2; with a `conv` kernel (t, h, w), fc1's output h gets a depthwise 3D
    convolution over the token grid added to it, h + conv(h), before the GELU (as SANA's Mix-FFN;
    in raster order). The convolution starts at zero, so a new MLP computes what it would without it."""

    def __init__(self, width: int, hidden: int, conv: tuple[int, int, int] | None = None):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.conv = DepthwiseConv3d(hidden, conv) if conv else None
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, layout: TileLayout | None = None) -> torch.Tensor:
        h = self.fc1(x)
        if self.conv is not None:
            if layout is None:
                raise ValueError("an MLP with a token convolution (mlp_conv > 0) needs the tile "
                                 "layout of its tokens (the block passes ctx.layout)")
            # [B, S, C] in tile order -> [B, C, T, H, W] (channels-last strides: the fast CPU path)
            t, hh, w = layout.grid
            r = rearrange(layout.from_tiles(h, dim=1), "b (t h w) c -> b c t h w", t=t, h=hh, w=w)
            r = rearrange(self.conv(r), "b c t h w -> b (t h w) c")
            h = h + layout.to_tiles(r, dim=1)
        return self.fc2(self.act(h))


class DiTBlock(nn.Module):
    """Pre-norm transformer block: modulated self-attention, [cross-attention], modulated MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg)
        self.cross = CrossAttention(cfg) if cfg.text_dim else None
        self.norm_cross = nn.LayerNorm(cfg.width, eps=1e-6) if cfg.text_dim else None
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.mlp_conv_kernel)
        # adaLN-single: this block's learned offsets to the shared (shift, scale, gate) x 2.
        self.modulation = nn.Parameter(torch.zeros(6, cfg.width))

    def forward(self, x: torch.Tensor, c6: torch.Tensor, rope: Rope, ctx: AttentionContext,
                text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + c6).unbind(dim=1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, rope, ctx)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), text, text_mask)
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None] * self.mlp(h, ctx.layout)


class VideoDiT(SparsityKnobs, nn.Module):
    """Video Diffusion Transformer predicting the flow-matching velocity (see module docstring).

    forward(x [B, C, T, H, W], t [B] in [0, 1], labels [B] | None, text [B, L, text_dim] | None,
            text_mask [B, L] bool (True = attend) | None,
            cond_drop [B] bool (CFG dropout; None = drawn in training) | None) -> [B, C_out, T, H, W]

    `sparsity` / `topk` are plain mutable attributes put into every attention context, so a
    training schedule can anneal them; `set_attention` swaps the backend (e.g. for sampling).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Linear(cfg.in_channels * cfg.patch_volume, w)
        self.t_embed = TimestepEmbedder(w)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, w) if cfg.num_classes else None
        self.text_embed = (nn.Sequential(nn.Linear(cfg.text_dim, w), nn.GELU(approximate="tanh"),
                                         nn.Linear(w, w)) if cfg.text_dim else None)
        # Captions -> text embeddings (0 = padding), when the model brings its own vocabulary.
        self.word_embed = (nn.Embedding(len(cfg.caption_words) + 1, cfg.text_dim, padding_idx=0)
                           if cfg.caption_words else None)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))  # adaLN-single, shared
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Parameter(torch.zeros(2, w))  # learned (shift, scale) offsets
        self.final_linear = nn.Linear(w, cfg.patch_volume * cfg.out_channels)
        self.sparsity, self.topk = cfg.sparsity, cfg.topk
        self._geometry: dict[tuple, tuple[TileLayout, torch.Tensor, torch.Tensor]] = {}
        self.blocks_compiled = False
        self.blocks_graphed = False  # compiled with CUDA graphs (mode reduce-overhead / max-autotune)
        self.initialize_weights()

    # ---- set-up ------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, zero biases; zero gates/offsets/final layer (identity blocks)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        if self.word_embed is not None:
            nn.init.normal_(self.word_embed.weight, std=1.0)
            with torch.no_grad():
                self.word_embed.weight[0].zero_()
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        nn.init.zeros_(self.final_linear.weight)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
            if block.cross is not None:  # the text path also starts switched off
                nn.init.zeros_(block.cross.proj.weight)
        nn.init.zeros_(self.final_modulation)
        for block in self.blocks:  # the token convolution starts switched off
            if block.mlp.conv is not None:
                nn.init.zeros_(block.mlp.conv.weight)
                nn.init.zeros_(block.mlp.conv.bias)
        for block in self.blocks:  # last, so a backend's own init is not overwritten
            block.attn.backend.reset_parameters()

    def set_attention(self, name: str, **options) -> None:
        """Replace every block's attention backend by a freshly built `name` backend.

        Parameters of the old backend (e.g. VSA gates) are dropped; the new one starts from its
        own init (VSA "adapt" gates start at G_c = 0, G_f = 1, i.e. dense-equivalent at sparsity 0).
        """
        cfg = self.cfg
        param = next(self.parameters())
        for block in self.blocks:
            backend = build_backend(name, cfg.width, cfg.n_heads, cfg.head_dim, **options)
            block.attn.backend = backend.to(device=param.device, dtype=param.dtype)
        self.cfg = dataclasses.replace(cfg, attention=name, attention_options=dict(options))

    def set_tile(self, tile) -> None:
        """Use tiles of `tile` = (t, h, w) tokens from now on, e.g. GRAT's 4x8x8 groups at sampling.

        No weight depends on the tile: it fixes the tile-major token order and the tiles that VSA
        and the static patterns work on. The cached layouts and tile-ordered RoPE angles are
        dropped and rebuilt for the new tile, so full attention computes the same function as
        before (up to floating point) and a pattern gets groups of the new size.
        """
        try:
            tile = int_triple("tile", tile)
        except (TypeError, ValueError):
            raise ValueError(f"tile must be 3 positive ints (t, h, w) in tokens, e.g. [4, 8, 8], "
                             f"got {tile!r}") from None
        self.cfg = dataclasses.replace(self.cfg, tile=tile)
        self._geometry.clear()

    def compile_blocks(self, **options) -> None:
        """torch.compile every block in place (`nn.Module.compile`): norms, RoPE, modulation and
        gating fuse around the matmuls and the attention op. Parameter names and the state dict are
        unchanged. Default options: fullgraph=True (a graph break in a block is a bug), dynamic=False
        (one graph per video shape; all blocks share it)."""
        options = compile_in_place(self.blocks, **options)
        self.blocks_compiled = True
        self.blocks_graphed = options.get("mode") in ("reduce-overhead", "max-autotune")

    # ---- token geometry ----------------------------------------------------------------------

    def geometry(self, grid: tuple[int, int, int],
                 device: torch.device) -> tuple[TileLayout, torch.Tensor, torch.Tensor]:
        """Tile layout and RoPE (cos, sin) in tile-major order for a token grid (cached)."""
        key = (grid, str(device))
        if key not in self._geometry:
            layout = TileLayout(grid, self.cfg.tile, device=device, order=self.cfg.tile_order)
            angles = layout.to_tiles(rope_angles(grid, self.cfg.head_dim, self.cfg.rope_theta), dim=0)
            self._geometry[key] = (layout, angles.cos().to(device), angles.sin().to(device))
        return self._geometry[key]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> raster-order tokens [B, T'*H'*W', C*pt*ph*pw]."""
        pt, ph, pw = self.cfg.patch
        return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Raster-order tokens [B, S, C*pt*ph*pw] -> [B, C, T, H, W]."""
        (pt, ph, pw), (t, h, w) = self.cfg.patch, grid
        return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                         t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)

    # ---- conditioning ------------------------------------------------------------------------

    def _check_inputs(self, x, t, labels, text, text_mask) -> None:
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, C={cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}] (one time in [0, 1] per sample), "
                             f"got {tuple(t.shape)}")
        if labels is not None:
            if not cfg.num_classes:
                raise ValueError("labels given but the model has no class embedding "
                                 "(num_classes=0); build it with num_classes > 0")
            if labels.shape != (x.shape[0],):
                raise ValueError(f"labels must be [B] = [{x.shape[0]}], got {tuple(labels.shape)}")
        if cfg.text_dim:
            if text is None:
                raise ValueError(f"this model cross-attends to text (text_dim={cfg.text_dim}); pass "
                                 f"text=[B, L, {cfg.text_dim}] (zeros for the unconditional branch)")
            if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.text_dim:
                raise ValueError(f"text must be [B={x.shape[0]}, L, text_dim={cfg.text_dim}], got "
                                 f"{tuple(text.shape)}; project the embeddings or set text_dim")
            if text_mask is not None and (text_mask.shape != text.shape[:2]
                                          or text_mask.dtype != torch.bool):
                raise ValueError(f"text_mask must be a bool tensor [B, L] = {tuple(text.shape[:2])}"
                                 f" (True = attend), got {text_mask.dtype} {tuple(text_mask.shape)}")
        elif text is not None:
            raise ValueError("text given but the model has no cross-attention (text_dim=0); "
                             "build it with text_dim = the embedding width")

    def _condition(self, t, labels, text, text_mask, cond_drop=None):
        """Per-sample embedding c [B, W] and projected text tokens, with CFG dropout: `cond_drop`
        when given, else drawn in training."""
        B = t.shape[0]
        c = self.t_embed(t)
        drop = cond_drop
        if drop is None and self.training and self.cfg.cond_dropout > 0:
            drop = torch.rand(B, device=t.device) < self.cfg.cond_dropout
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((B,), self.cfg.num_classes, dtype=torch.long, device=t.device)
            elif drop is not None:
                labels = torch.where(drop, self.cfg.num_classes, labels)
            c = c + self.label_embed(labels)
        if self.text_embed is not None:
            if drop is not None:  # the null text is all-zero embeddings, attended in full
                text = torch.where(drop[:, None, None], torch.zeros_like(text), text)
                if text_mask is not None:
                    text_mask = text_mask | drop[:, None]
            text = self.text_embed(text)
        return c, text, text_mask

    def embed_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings [B, L, text_dim] and mask [B, L] (True = a word) of captions made of
        the model's `caption_words` (lower-cased, split at spaces; L = the longest caption), for
        `forward(text=..., text_mask=...)`. A word outside the vocabulary is an error that lists it."""
        if self.word_embed is None:
            raise ValueError("this model has no caption vocabulary (caption_words); pass text embeddings "
                             "from a text encoder instead")
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions) or not len(captions):
            raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
        index = {word: i + 1 for i, word in enumerate(self.cfg.caption_words)}
        rows = [caption.lower().split() for caption in captions]
        unknown = sorted({word for row in rows for word in row if word not in index})
        if unknown:
            raise ValueError(f"caption words {unknown} are not in the model's vocabulary: "
                             f"{' '.join(self.cfg.caption_words)}")
        length = max(1, max(len(row) for row in rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long, device=self.word_embed.weight.device)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor([index[word] for word in row], dtype=torch.long)
        return self.word_embed(ids), ids > 0

    def null_condition(self, cond: dict) -> dict:
        """The unconditional counterpart of `cond` (same keys and shapes), for classifier-free
        guidance: labels -> the null class, text -> zeros attended in full (as in training)."""
        null = {}
        for key, value in cond.items():
            if value is None:
                null[key] = None
            elif key == "labels":
                null[key] = torch.full_like(value, self.cfg.num_classes)
            elif key == "text":
                null[key] = torch.zeros_like(value)
            elif key == "text_mask":
                null[key] = torch.ones_like(value)
            else:
                raise ValueError(f"unknown condition {key!r}; VideoDiT takes labels, text, text_mask")
        return null

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, t, labels, text, text_mask)
        if cond_drop is not None and (cond_drop.shape != t.shape or cond_drop.dtype != torch.bool):
            raise ValueError(f"cond_drop must be a bool tensor [B] = {tuple(t.shape)} (True = drop the "
                             f"sample's condition), got {cond_drop.dtype} {tuple(cond_drop.shape)}")
        grid = self.cfg.token_grid(x.shape[2:])
        layout, cos, sin = self.geometry(grid, x.device)

        tokens = layout.to_tiles(self.patchify(x), dim=1)  # the one permutation into tile order
        h = self.patch_embed(tokens)
        c, text, text_mask = self._condition(t, labels, text, text_mask, cond_drop)
        c6 = self.t_block(c).unflatten(1, (6, self.cfg.width))
        # Every block has the same kind of backend (set_attention); what it derives from the layout
        # alone (a static pattern's map) is built here, outside the compiled blocks.
        ctx = AttentionContext(layout=layout, sparsity=self.sparsity, topk=self.topk,
                               prepared=self.blocks[0].attn.backend.prepare(layout, x.shape[0]))
        recompute = self.cfg.checkpointed_blocks if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if i < recompute:
                h = checkpoint(block, h, c6, (cos, sin), ctx, text, text_mask, use_reentrant=False)
            else:
                h = block(h, c6, (cos, sin), ctx, text, text_mask)
            if self.blocks_graphed and not torch.is_grad_enabled():
                # All blocks replay one CUDA graph whose output buffer the next block overwrites
                # while reading it (PyTorch: clone the outputs of a graphed call you keep).
                h = h.clone()

        shift, scale = (self.final_modulation + c[:, None]).unbind(dim=1)
        out = self.final_linear(modulate(self.final_norm(h), shift, scale))
        out = self.unpatchify(layout.from_tiles(out, dim=1), grid)  # and the one back
        if self.cfg.prediction == "x0":  # the network predicts x0; the model returns a velocity
            return (x - out) / t.clamp(min=X0_MIN_T).to(out.dtype).view(-1, 1, 1, 1, 1)
        return out


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
