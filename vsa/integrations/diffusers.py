"""Sparse attention for diffusers transformers: Wan (video) and Flux (image, joint text + image).

    from vsa.integrations.diffusers import apply_sparse_attention
    handle = apply_sparse_attention(pipe.transformer, "grat_b", tile=(4, 8, 8))  # radius=(1, 1, 1)
    video = pipe(prompt, ...).frames                                             # GRAT-B inside
    handle.remove()                                                              # diffusers' own again

What changes: the self-attention of the video / image tokens. Their (T, H, W) token grid after
patchify is read from each transformer call (a forward pre-hook: Wan from the latent's shape and
`patch_size`, Flux from `img_ids`, which must describe one raster grid), or fixed with `grid=`. The
model keeps its raster token order: inside each replaced attention module the tokens are permuted
into tile-major order (`TileLayout.to_tiles`), projected, attended with the pattern, projected out
and permuted back. The permutation is exact (all per-token ops commute with it), so with a pattern
that keeps every tile the output equals diffusers' own attention up to float rounding.

- Wan (`WanTransformer3DModel`): each block's self-attention (`attn1`) is replaced; text
  cross-attention (`attn2`, incl. I2V image context) keeps diffusers' dense processor.
- Flux (`FluxTransformer2DModel`): joint attention over [text; image] tokens in both the
  double-stream and the single-stream blocks. Text queries attend to every token (dense); image
  queries attend to all text tokens (dense) plus the image key tiles of the pattern. Exact: the
  image rows run ONE block-sparse softmax whose key list is the pattern's tiles plus the text tokens
  (appended as extra key segments), so no partial softmaxes are merged. GRAT grouped Flux tokens in
  16x16 groups: `tile=(1, 16, 16)` (the default for Flux). GRAT-X on an image (one tile along t) is
  the 2D criss-cross (tile-row or tile-column).

Patterns: "grat_b" (radius), "grat_x" (lines), "sta" (window), all from `vsa.ops.patterns`, and
"vsa": each query tile keeps the top-K key tiles by coarse (tile-mean) score, K from `topk` or
`sparsity`. A pretrained dense model has no VSA gates, so "vsa" here outputs the fine stage only
(O = O_f, i.e. G_c = 0, G_f = 1: what a VSA "adapt" finetune starts from). Everything is
differentiable (forward and backward kernels), so the patterns can be finetuned in diffusers.

Trained VSA on Wan: `apply_sparse_attention(..., "vsa", gates=wan_gates(transformer))` adds the
coarse stage, O = O_c * G_c + O_f, with G_c one zero-initialised trainable linear layer per block
(`vsa.models.wan` finetunes them); `save_sparse_attention` / `load_sparse_attention` keep trained
gates and settings next to the transformer's `save_pretrained` files (docs/wan.md).

Needs diffusers >= 0.35 (the `WanAttention` / `FluxAttention` processor interface with (cos, sin)
rotary embeddings). Not supported: attention masks on the replaced modules, context parallelism.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vsa.attention import BACKENDS
from vsa.layout import TileFill, TileLayout, int_triple
from vsa.ops import (
    SUPPORTED_HEAD_DIMS,
    check_dtypes,
    check_impl,
    fine_attention,
    patterns,
    resolve_impl,
    resolve_topk,
    select_key_tiles,
    video_sparse_attention,
)

DEFAULT_TILES = {"wan": (4, 8, 8), "flux": (1, 16, 16)}
# The backends that run on the block-sparse kernel: the static patterns and the ones that select
# their key tiles (VSA), as vsa.attention describes them.
MODES = (*patterns.PATTERNS, *(name for name, backend in BACKENDS.items() if backend.needs_sparsity))


@dataclass(frozen=True)
class _KeySegments:
    """Key/value token segments for the kernel: the image tiles plus text chunks. `fine_attention`
    reads exactly these three attributes of a kv layout."""

    offsets: torch.Tensor  # int32 [n_segments + 1]
    max_tile_size: int
    fill: TileFill  # FULL when every segment has max_tile_size tokens, else RAGGED


class SparseAttentionCore:
    """Which key tiles each query tile of the video / image tokens attends to, and the attention.

    Args:
        mode: "grat_b", "grat_x", "sta" (static maps) or "vsa" (top-K tiles by coarse score).
        tile: tile (group) size (t, h, w) in tokens of the post-patchify grid.
        grid: the (T, H, W) token grid; None = set per call (by the handle's forward pre-hook).
        impl: None (Triton kernels on CUDA, torch on CPU), "triton" or "torch".
        topk / sparsity: for "vsa" (exactly one).
        **options: the pattern's options (radius, lines, window).
    """

    def __init__(self, mode: str, tile, grid=None, impl: str | None = None, topk: int | None = None,
                 sparsity: float | None = None, **options):
        if mode not in MODES:
            raise ValueError(f"unknown sparse attention mode {mode!r}; choose one of {MODES}")
        check_impl(impl)
        self.selects = BACKENDS[mode].needs_sparsity  # top-K tiles by coarse score (VSA)
        if self.selects:
            if options:
                raise TypeError(f"mode 'vsa' takes topk or sparsity, not {sorted(options)}")
            resolve_topk(1, topk, sparsity)  # exactly one of them, in range
            self.options = {}
        else:
            if topk is not None or sparsity is not None:
                raise TypeError(f"topk / sparsity are VSA options; pattern {mode!r} fixes its tiles")
            self.options = patterns.pattern_options(mode, **options)
        self.mode, self.tile, self.impl = mode, int_triple("tile", tile), impl
        self.topk, self.sparsity = topk, sparsity
        self.grid = None if grid is None else int_triple("grid", grid)
        self._cache: dict = {}

    def __repr__(self) -> str:
        opts = {"topk": self.topk, "sparsity": self.sparsity} if self.selects else self.options
        return f"SparseAttentionCore(mode={self.mode!r}, tile={self.tile}, grid={self.grid}, {opts})"

    def _cached(self, key, build):
        """Per-(grid, device, ...) values, built on first use (a few entries per resolution)."""
        if key not in self._cache:
            if len(self._cache) >= 64:  # e.g. many resolutions: start over rather than grow
                self._cache.clear()
            self._cache[key] = build()
        return self._cache[key]

    # ---- geometry ----------------------------------------------------------------------------

    def layout(self, n_tokens: int, device: torch.device) -> TileLayout:
        """The tile layout of the current grid, checked against the number of video/image tokens."""
        if self.grid is None:
            raise RuntimeError(
                "the token grid (T, H, W) of this call is unknown: use apply_sparse_attention (its "
                "hook reads the grid from every transformer call) or pass grid=(T, H, W)")
        if math.prod(self.grid) != n_tokens:
            raise ValueError(
                f"the attention sees {n_tokens} video/image tokens but the grid {self.grid} has "
                f"{math.prod(self.grid)}; set the grid of the post-patchify tokens")
        return self._cached(("layout", self.grid, str(device)),
                            lambda: TileLayout(self.grid, self.tile, device))

    def joint_perm(self, n_text: int, layout: TileLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Permutation of a [text; image raster] sequence to [text; image tile-major], and back."""
        def build():
            text = torch.arange(n_text, device=layout.device)
            return torch.cat([text, n_text + layout.perm]), torch.cat([text, n_text + layout.inv_perm])

        return self._cached(("joint", n_text, layout.grid, str(layout.device)), build)

    def _segments(self, n_text: int, layout: TileLayout) -> tuple[_KeySegments, int]:
        """Key segments [text chunks; image tiles] of a [text; image tile-major] key sequence, and
        the number of text chunks (each at most one tile long, so the kernel's blocks fit)."""
        def build():
            chunk = layout.max_tile_size
            n_chunks = math.ceil(n_text / chunk)
            text_off = torch.clamp(torch.arange(n_chunks + 1) * chunk, max=n_text)
            offsets = torch.cat([text_off, n_text + layout.offsets[1:].cpu().long()]).to(torch.int32)
            sizes = offsets[1:] - offsets[:-1]
            ragged = bool((sizes != sizes.max()).any())
            segments = _KeySegments(offsets.to(layout.device), int(sizes.max()),
                                    TileFill.RAGGED if ragged else TileFill.FULL)
            return segments, n_chunks

        return self._cached(("segments", n_text, layout.grid, str(layout.device)), build)

    # ---- block lists -------------------------------------------------------------------------

    def _static_map(self, layout: TileLayout, n_chunks: int, batch: int, heads: int):
        """The pattern's map with the text chunks' segments (0 .. n_chunks-1) listed first and the
        image tiles shifted by n_chunks, as contiguous [B, H, n, K] + [B, H, n] (cached with the
        attention backends' maps)."""
        return patterns.batched_map(self.mode, layout, batch, heads, n_prefix=n_chunks, **self.options)

    def _vsa_map(self, q, k, v, layout: TileLayout, n_chunks: int, impl: str):
        """Top-K key tiles per query tile by coarse score (no gradient), plus all text chunks."""
        idx, cnt = select_key_tiles(q, k, v, layout, self.topk, self.sparsity, impl=impl)
        return patterns.prepend_keys(idx, cnt, n_chunks)

    # ---- attention ---------------------------------------------------------------------------

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> None:
        check_dtypes(q, k, v)
        if impl == "triton" and q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head dim {q.shape[-1]} is not supported by the kernels "
                             f"({SUPPORTED_HEAD_DIMS}); use impl='torch' or a model with such heads")

    def set_sparsity(self, sparsity: float | None = None, topk: int | None = None) -> None:
        """VSA: change how many key tiles each query tile keeps (exactly one of them), e.g. from
        a training schedule; the next call uses it."""
        if not self.selects:
            raise TypeError(f"sparsity / topk are VSA settings; pattern {self.mode!r} fixes its tiles")
        resolve_topk(1, topk, sparsity)
        self.topk, self.sparsity = topk, sparsity

    def attend_gated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout,
                     gate_c: torch.Tensor) -> torch.Tensor:
        """VSA with its coarse stage: O = O_c * gate_c + O_f (the "adapt" gates: G_f = 1), q, k,
        v, gate_c [B, S, H, D] tile-major. With gate_c = 0 (a fresh gate projection) it equals
        `attend`; at sparsity 0 that is dense attention."""
        impl = resolve_impl(q, self.impl)
        self._check(q, k, v, impl)
        return video_sparse_attention(q, k, v, layout, topk=self.topk, sparsity=self.sparsity,
                                      gate_c=gate_c, impl=impl)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout,
               n_text: int = 0) -> torch.Tensor:
        """Attention of a [text; image tile-major] sequence, q, k, v [B, n_text + S, H, D]:
        text queries attend to every token (dense), image queries to all text tokens plus the key
        tiles of the pattern. n_text = 0: video/image self-attention alone. Returns [B, L, H, D]."""
        impl = resolve_impl(q, self.impl)
        self._check(q, k, v, impl)
        q_img = q[:, n_text:]
        # Keys: the image tiles alone, or the text chunks followed by the image tiles.
        segments, n_chunks = self._segments(n_text, layout) if n_text else (layout, 0)
        if self.selects:
            idx, cnt = self._vsa_map(q_img, k[:, n_text:], v[:, n_text:], layout, n_chunks, impl)
        else:
            idx, cnt = self._static_map(layout, n_chunks, q.shape[0], q.shape[2])
        o_img = fine_attention(q_img, k, v, layout, idx, cnt, kv_layout=segments, impl=impl)
        if not n_text:
            return o_img
        q_text, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q[:, :n_text], k, v))
        o_text = rearrange(F.scaled_dot_product_attention(q_text, k, v), "b h s d -> b s h d")
        return torch.cat([o_text, o_img.to(o_text.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------


def _no_context_parallel(processor) -> None:
    if getattr(processor, "_parallel_config", None) is not None:
        raise NotImplementedError("sparse attention processors do not support diffusers' context "
                                  "parallelism (each rank would see part of the token grid)")


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs (as in diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor:
    """Self-attention of a diffusers `WanAttention` (a block's `attn1`) with a sparse pattern on the
    video tokens. Tokens enter and leave in raster order; inside, they are tile-major.

    `gate`: for mode "vsa", VSA's coarse-stage gate G_c, a linear layer `dim -> inner_dim` of the
    attention's input (the block's normalised, modulated hidden states), per token and channel;
    the output is then O_c * G_c + O_f. None: the fine stage alone (G_c = 0)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore, gate: nn.Module | None = None):
        if gate is not None and not core.selects:
            raise ValueError(f"a gate is VSA's (mode 'vsa'); pattern {core.mode!r} has no coarse stage")
        self.core = core
        self.gate = gate

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None) -> torch.Tensor:
        _no_context_parallel(self)
        if encoder_hidden_states is not None:
            raise ValueError("WanSparseAttnProcessor is for self-attention (attn1); cross-attention "
                             "to text stays on diffusers' processor")
        if attention_mask is not None:
            raise NotImplementedError("WanSparseAttnProcessor does not take an attention mask")
        layout = self.core.layout(hidden_states.shape[1], hidden_states.device)
        x = layout.to_tiles(hidden_states, dim=1)  # per-token ops below commute with the order
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (rearrange(t, "b s (h d) -> b s h d", h=attn.heads) for t in (query, key, value))
        if rotary_emb is not None:
            if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
                raise TypeError("expected Wan's rotary embedding as (cos, sin) [1, S, 1, D] "
                                "(diffusers >= 0.35)")
            cos, sin = (f.index_select(1, layout.perm.to(f.device)) for f in rotary_emb)
            query, key = _wan_rotary(query, cos, sin), _wan_rotary(key, cos, sin)
        if self.gate is None:
            out = self.core.attend(query, key, value, layout)
        else:
            gate_c = rearrange(self.gate(x), "b s (h d) -> b s h d", h=attn.heads)
            out = self.core.attend_gated(query, key, value, layout, gate_c)
        out = rearrange(out, "b s h d -> b s (h d)").type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        return layout.from_tiles(out, dim=1)


class FluxSparseAttnProcessor:
    """Joint text + image attention of a diffusers `FluxAttention` (double- and single-stream
    blocks) with a sparse pattern on the image tokens; text stays dense (see the module docstring)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, core: SparseAttentionCore):
        from diffusers.models.embeddings import apply_rotary_emb

        self.core = core
        self._apply_rotary_emb = apply_rotary_emb

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, image_rotary_emb=None):
        _no_context_parallel(self)
        if attention_mask is not None:
            raise NotImplementedError("FluxSparseAttnProcessor does not take an attention mask")
        joint = encoder_hidden_states is not None
        if joint and attn.added_kv_proj_dim is None:
            raise ValueError("encoder_hidden_states given to a Flux attention without text projections")
        grid_tokens = math.prod(self.core.grid) if self.core.grid is not None else 0
        # Double-stream: hidden_states are the image tokens. Single-stream: [text; image].
        n_text = encoder_hidden_states.shape[1] if joint else hidden_states.shape[1] - grid_tokens
        n_image = hidden_states.shape[1] - (0 if joint else n_text)
        layout = self.core.layout(n_image, hidden_states.device)
        perm, inv = self.core.joint_perm(n_text, layout)
        x = layout.to_tiles(hidden_states, dim=1) if joint else hidden_states.index_select(1, perm)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        query, key, value = (rearrange(t, "b s (h d) -> b s h d", d=attn.head_dim) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if joint:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                e_q, e_k, e_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)
            e_q, e_k, e_v = (rearrange(t, "b s (h d) -> b s h d", d=attn.head_dim) for t in (e_q, e_k, e_v))
            e_q, e_k = attn.norm_added_q(e_q), attn.norm_added_k(e_k)
            query, key, value = (torch.cat([e, t], dim=1)
                                 for e, t in ((e_q, query), (e_k, key), (e_v, value)))
        if image_rotary_emb is not None:
            if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
                raise TypeError("expected Flux's rotary embedding as (cos, sin) [S, D] (diffusers >= 0.35)")
            rope = tuple(f.index_select(0, perm.to(f.device)) for f in image_rotary_emb)
            query = self._apply_rotary_emb(query, rope, sequence_dim=1)
            key = self._apply_rotary_emb(key, rope, sequence_dim=1)

        out = rearrange(self.core.attend(query, key, value, layout, n_text), "b s h d -> b s (h d)")
        out = out.to(query.dtype)
        if not joint:
            return out.index_select(1, inv)
        text_out, image_out = out.split_with_sizes([n_text, n_image], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return layout.from_tiles(image_out, dim=1), text_out


# --------------------------------------------------------------------------------------------------
# Installing on a model
# --------------------------------------------------------------------------------------------------


def _model_kind(transformer) -> str:
    names = {type(m).__name__ for m in transformer.modules()}
    if "WanAttention" in names:
        return "wan"
    if "FluxAttention" in names:
        return "flux"
    raise TypeError(f"{type(transformer).__name__} is not supported: apply_sparse_attention knows "
                    "diffusers' WanTransformer3DModel and FluxTransformer2DModel (diffusers >= 0.35)")


def _call_arguments(transformer, args, kwargs) -> dict:
    return inspect.signature(transformer.forward).bind_partial(*args, **kwargs).arguments


def wan_grid(transformer, hidden_states: torch.Tensor) -> tuple[int, int, int]:
    """Post-patchify token grid of a Wan latent [B, C, F, H, W]."""
    pt, ph, pw = transformer.config.patch_size
    _, _, f, h, w = hidden_states.shape
    return (f // pt, h // ph, w // pw)


def flux_grid(img_ids: torch.Tensor) -> tuple[int, int, int]:
    """(1, h, w) of Flux image tokens whose ids (0, row, col) [S, 3] list one raster grid."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    raster = torch.arange(ids.shape[0], device=ids.device)
    if h * w != ids.shape[0] or not bool(((rows * w + cols) == raster).all()):
        raise ValueError("img_ids do not describe one raster grid of image tokens (e.g. Flux Kontext "
                         "appends reference-image tokens); pass grid=(1, h, w) to apply_sparse_attention "
                         "only if the image tokens form that grid")
    return (1, h, w)


def _self_attentions(transformer, kind: str) -> list:
    """The modules whose attention is replaced, in module order."""
    names = ("WanAttention",) if kind == "wan" else ("FluxAttention",)
    return [module for module in transformer.modules() if type(module).__name__ in names
            and not (kind == "wan" and module.is_cross_attention)]


def wan_gates(transformer) -> nn.ModuleList:
    """VSA's coarse-stage gates G_c for a diffusers Wan transformer, zero-initialised: one linear
    layer `dim -> inner_dim` per self-attention (`attn1`), in block order. With them at zero the
    model computes what it did without them (the fine stage; dense attention at sparsity 0), so a
    finetune can start from the pretrained weights and learn to mix the coarse stage in."""
    if _model_kind(transformer) != "wan":
        raise TypeError("VSA gates are implemented for diffusers' WanTransformer3DModel only")
    gates = nn.ModuleList()
    for attn in _self_attentions(transformer, "wan"):
        weight = attn.to_out[0].weight  # the attention's device and dtype
        gate = nn.Linear(weight.shape[0], attn.inner_dim, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        gates.append(gate)
    return gates


class _GridHook:
    """Forward pre-hook that reads the token grid of every transformer call into the core. An
    object, not a closure, so that a deep copy of the model (an EMA copy) sets its own core."""

    def __init__(self, core: SparseAttentionCore, kind: str):
        self.core, self.kind = core, kind

    def __call__(self, module, args, kwargs) -> None:
        arguments = _call_arguments(module, args, kwargs)
        if self.kind == "wan":
            latents = arguments["hidden_states"]
            self.core.grid = wan_grid(module, latents)
            # Build the layout here, outside the blocks (compiled blocks find it in the cache).
            self.core.layout(math.prod(self.core.grid), latents.device)
        else:
            if arguments.get("img_ids") is None:
                raise ValueError("Flux was called without img_ids: the image token grid is unknown")
            self.core.grid = flux_grid(arguments["img_ids"])


class SparseAttentionHandle:
    """What `apply_sparse_attention` installed; `remove()` (or leaving a `with` block) restores
    diffusers' processors and removes the grid hook. `gates`: VSA's gates (None without)."""

    def __init__(self, core: SparseAttentionCore, replaced: list, hook, gates: nn.ModuleList | None = None):
        self.core = core
        self.gates = gates
        self._replaced = replaced
        self._hook = hook

    @property
    def grid(self):
        return self.core.grid

    @property
    def n_modules(self) -> int:
        return len(self._replaced)

    def remove(self) -> None:
        for module, processor in self._replaced:
            module.set_processor(processor)
        self._replaced = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_sparse_attention(transformer, mode: str = "grat_b", tile=None, grid=None,
                           impl: str | None = None, gates=None, **options) -> SparseAttentionHandle:
    """Run a diffusers Wan or Flux transformer with a sparse pattern on its video / image tokens.

    Args:
        transformer: a diffusers `WanTransformer3DModel` or `FluxTransformer2DModel`.
        mode: "grat_b" (radius=...), "grat_x" (lines=...), "sta" (window=...) or "vsa"
            (topk=... or sparsity=...).
        tile: group size in post-patchify tokens; default (4, 8, 8) for Wan, (1, 16, 16) for Flux.
        grid: fixed (T, H, W) token grid; None = read from every call (recommended).
        impl: None (Triton on CUDA, torch on CPU), "triton" or "torch".
        gates: VSA on Wan only: the coarse-stage gates, `wan_gates(transformer)` (zero, trainable)
            or trained ones (`load_sparse_attention` reads them from a folder); None = the fine
            stage alone.
        **options: the pattern's options.
    Returns a `SparseAttentionHandle` (`.remove()` restores the model; usable as a context manager).
    """
    kind = _model_kind(transformer)
    core = SparseAttentionCore(mode, tile or DEFAULT_TILES[kind], grid=grid, impl=impl, **options)
    modules = _self_attentions(transformer, kind)
    if not modules:
        raise TypeError(f"found no self-attention module to replace in {type(transformer).__name__}")
    if gates is not None:
        if kind != "wan" or not core.selects:
            raise ValueError("gates are VSA's coarse-stage gates, implemented for Wan: use "
                             "mode='vsa' on a WanTransformer3DModel, or gates=None")
        if len(gates) != len(modules):
            raise ValueError(f"{len(gates)} gates for {len(modules)} self-attention modules; build "
                             "them with wan_gates(transformer) for this model")
    replaced = []
    for i, module in enumerate(modules):
        replaced.append((module, module.processor))
        if kind == "wan":
            module.set_processor(WanSparseAttnProcessor(core, None if gates is None else gates[i]))
        else:
            module.set_processor(FluxSparseAttnProcessor(core))

    hook = None
    if grid is None:
        hook = transformer.register_forward_pre_hook(_GridHook(core, kind), with_kwargs=True)
    return SparseAttentionHandle(core, replaced, hook, gates)


# --------------------------------------------------------------------------------------------------
# Trained VSA gates next to a diffusers checkpoint
# --------------------------------------------------------------------------------------------------

GATES_FILE = "vsa_gates.safetensors"  # the gates G_c, "<attn1 module name>.weight" / ".bias"
SETTINGS_FILE = "vsa_attention.json"  # mode, tile, sparsity / topk the gates were trained with


def save_sparse_attention(folder, transformer, handle: SparseAttentionHandle) -> None:
    """Write the VSA settings and gates of `handle` (installed on `transformer`) into `folder`,
    next to the transformer's own `save_pretrained` files, for `load_sparse_attention`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    core = handle.core
    if not core.selects or handle.gates is None:
        raise ValueError("save_sparse_attention saves trained VSA gates; this handle has none")
    names = {module: name for name, module in transformer.named_modules()}
    state = {}
    for (module, _), gate in zip(handle._replaced, handle.gates, strict=True):
        for key, value in gate.state_dict().items():
            state[f"{names[module]}.{key}"] = value.detach().contiguous().cpu()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / GATES_FILE), metadata={"format": "vsa-wan-gates-v1"})
    settings = {"mode": core.mode, "tile": list(core.tile), "sparsity": core.sparsity, "topk": core.topk}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def load_sparse_attention(transformer, folder, grid=None, impl: str | None = None,
                          **overrides) -> SparseAttentionHandle:
    """Install VSA with the gates and settings that `save_sparse_attention` (or
    `vsa.models.wan.WanVideoModel.save_pretrained`) wrote into `folder` on a Wan transformer,
    e.g. one loaded from the same folder with `WanTransformer3DModel.from_pretrained(folder)`.
    `overrides`: settings to change, e.g. sparsity=0.9 or topk=16."""
    import json
    from pathlib import Path

    folder = Path(folder)
    for name in (SETTINGS_FILE, GATES_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: it is not a folder written by "
                                    "save_sparse_attention / WanVideoModel.save_pretrained")
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    if "topk" in overrides or "sparsity" in overrides:  # one replaces the other
        settings.pop("topk", None)
        settings.pop("sparsity", None)
    settings.update(overrides)
    if settings.get("topk") is None:
        settings.pop("topk", None)
    else:
        settings.pop("sparsity", None)
    mode, tile = settings.pop("mode"), settings.pop("tile")
    return apply_sparse_attention(transformer, mode, tile=tile, grid=grid, impl=impl,
                                  gates=load_gates(transformer, folder), **settings)


def load_gates(transformer, folder) -> nn.ModuleList:
    """The trained VSA gates in `folder`/vsa_gates.safetensors, for `transformer` (a Wan of the
    architecture they were trained in), as `wan_gates` lays them out."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / GATES_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GATES_FILE}: it is not a folder written by "
                                "save_sparse_attention / WanVideoModel.save_pretrained")
    gates = wan_gates(transformer)
    modules = _self_attentions(transformer, "wan")
    names = {module: name for name, module in transformer.named_modules()}
    state = load_file(str(folder / GATES_FILE))
    expected = {f"{names[m]}.{key}" for m in modules for key in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{folder / GATES_FILE} does not fit this transformer (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); load the transformer saved in the same folder")
    with torch.no_grad():
        for module, gate in zip(modules, gates, strict=True):
            gate.weight.copy_(state[f"{names[module]}.weight"])
            gate.bias.copy_(state[f"{names[module]}.bias"])
    return gates
