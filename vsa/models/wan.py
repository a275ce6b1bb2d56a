"""A pretrained diffusers Wan video transformer as a model of `vsa.training`, with VSA inside.

    model = build_wan(pretrained="/models/Wan2.1-T2V-1.3B-Diffusers", in_channels=16, sparsity=0.0)
    v = model(x_t, t, text=text_emb)          # flow-matching velocity, t in [0, 1]
    model.sparsity = 0.5                       # what the staircase callback does
    model.save_pretrained("out/")              # diffusers folder + vsa_gates.safetensors

`WanVideoModel` wraps a `diffusers.WanTransformer3DModel` loaded from a LOCAL folder (a
transformer folder, or a pipeline folder with a `transformer/` subfolder), or built at random from
config kwargs (tests). Every block's self-attention (`attn1`) runs VSA through
`vsa.integrations.diffusers` (coarse stage + top-K fine stage, combined as O_c * G_c + O_f: the
paper's "adapt" gates, G_c a zero-initialised trainable projection of the attention's input, G_f =
1); cross-attention to text (`attn2`) keeps diffusers' dense processor. At sparsity 0 with the
fresh gates the model computes what the pretrained dense model computes. `attention="full"` keeps
diffusers' own attention everywhere (a dense finetune baseline); "grat_b", "grat_x", "sta" install
those static patterns (no gates).

It speaks VideoDiT's language, so `VideoDiffusionModule` trains it unchanged: forward(x [B, C, T,
H, W], t [B] in [0, 1], text [B, L, text_dim], text_mask [B, L] | None, cond_drop [B] | None) -> v
= noise - x0, which is Wan's own flow-matching target (Wan takes timestep = 1000 t); `sparsity` /
`topk` attributes; and `cfg` (a `WanConfig`) answers what the module, the FLOP counter and the
checkpoint spec read of a DiTConfig. Wan's flow shift is the module's `timesteps.shift`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vsa.attention import BACKENDS
from vsa.data.text import load_null_text
from vsa.integrations.diffusers import (
    GATES_FILE,
    apply_sparse_attention,
    load_gates,
    save_sparse_attention,
    wan_gates,
)
from vsa.layout import int_triple
from vsa.models.config import SparsityKnobs, check_sparsity
from vsa.models.dit import compile_in_place

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WEIGHT_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
TIMESTEP_SCALE = 1000.0  # Wan's timestep = 1000 * t (diffusers' FlowMatch schedulers)
WAN_MODES = ("full", "vsa", "grat_b", "grat_x", "sta")


@dataclass
class WanConfig:
    """The Wan transformer's architecture (`transformer`, diffusers' config) plus the attention,
    with the DiTConfig fields that the training module, the FLOP counter and checkpoints read."""

    transformer: dict[str, Any]
    pretrained: str | None = None
    attention: str = "vsa"
    attention_options: dict[str, Any] = field(default_factory=dict)
    tile: tuple[int, int, int] = (4, 4, 4)
    sparsity: float | None = 0.875
    topk: int | None = None
    cond_dropout: float = 0.0
    null_text: str | None = None  # the empty prompt's embedding (vsa.data.text.save_null_text)
    activation_checkpointing: bool = False
    # Fixed for Wan (DiTConfig's names): text-conditioned, no classes, no caption vocabulary.
    num_classes: int = 0
    caption_words: tuple[str, ...] = ()
    tile_order: str = "cubes"
    mlp_conv: int = 0
    prediction: str = "velocity"  # Wan's pretrained transformer predicts the velocity

    def __post_init__(self) -> None:
        self.transformer = {k: v for k, v in dict(self.transformer).items() if not k.startswith("_")}
        self.tile = int_triple("tile", self.tile)
        self.attention_options = dict(self.attention_options)
        if self.attention not in WAN_MODES:
            raise ValueError(f"attention {self.attention!r} is not available for Wan; choose one of {WAN_MODES}")
        if self.num_classes or self.caption_words or self.tile_order != "cubes" or self.mlp_conv:
            raise ValueError("Wan is text-conditioned with tile_order=cubes: num_classes=0, no "
                             "caption_words, no mlp_conv")
        if self.prediction != "velocity":
            raise ValueError(f"Wan's transformer predicts the velocity: model.prediction must be "
                             f"'velocity', got {self.prediction!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if self.cond_dropout > 0 and self.null_text is None:
            raise ValueError("Wan's caption dropout needs the null text its pipeline guides against (the empty "
                             "prompt's embedding): set model.null_text=<shards>/null_text/null_text.safetensors "
                             "(scripts/encode_latents.py --text-encoder writes it), or cond_dropout=0")
        check_sparsity(self.sparsity, self.topk)
        if BACKENDS[self.attention].needs_sparsity:
            self.attention_options.setdefault("gates", "adapt")
            if self.attention_options != {"gates": "adapt"}:
                raise ValueError(f"Wan finetunes a dense checkpoint with VSA's 'adapt' gates (G_c "
                                 f"zero-initialised, G_f = 1); got attention options "
                                 f"{self.attention_options}: set attention.options.gates=adapt")

    # ---- DiTConfig's derived names ------------------------------------------------------------

    @property
    def depth(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def head_dim(self) -> int:
        return int(self.transformer["attention_head_dim"])

    @property
    def n_heads(self) -> int:
        return int(self.transformer["num_attention_heads"])

    @property
    def width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        return int(self.transformer["ffn_dim"])

    @property
    def mlp_conv_kernel(self) -> None:
        """No token convolution in Wan's MLPs (DiTConfig's name, for the FLOP counter)."""
        return None

    @property
    def in_channels(self) -> int:
        return int(self.transformer["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.transformer["out_channels"] or self.in_channels)

    @property
    def text_dim(self) -> int:
        return int(self.transformer["text_dim"])

    @property
    def patch(self) -> tuple[int, int, int]:
        return int_triple("patch_size", self.transformer["patch_size"])

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch)

    def token_grid(self, video_shape) -> tuple[int, int, int]:
        """Token grid (T', H', W') of a latent of shape (T, H, W) (channels excluded)."""
        shape = int_triple("latent shape", video_shape)
        if any(s % p for s, p in zip(shape, self.patch, strict=True)):
            raise ValueError(f"latent grid (T, H, W) = {shape} is not divisible by Wan's patch "
                             f"{self.patch}; crop the latents to a multiple of it")
        return tuple(s // p for s, p in zip(shape, self.patch, strict=True))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def transformer_folder(path: str | Path) -> Path:
    """The folder of a local diffusers Wan transformer: `path` itself, or its `transformer/`
    subfolder (a pipeline folder). Raises FileNotFoundError naming what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained Wan folder {path} does not exist (or is not a folder); "
                                "pass a local diffusers folder, e.g. a download of "
                                "Wan-AI/Wan2.1-T2V-1.3B-Diffusers or its transformer/ subfolder")
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"pretrained Wan folder {path} has no config.json (nor "
                                "transformer/config.json); it is not a diffusers model folder")
    class_name = json.loads(config.read_text()).get("_class_name")
    if class_name not in (None, "WanTransformer3DModel"):
        raise ValueError(f"{config} describes a {class_name}, not a WanTransformer3DModel")
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing or not shards:
                raise FileNotFoundError(f"pretrained Wan folder {folder} is incomplete: {index_name} lists "
                                        f"weight shards that are missing: {', '.join(missing) or 'none listed'}")
            return folder
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"pretrained Wan folder {folder} has config.json but no weights: "
                                f"expected {WEIGHT_FILES[0]} (or {WEIGHT_INDEXES[0]} with its shards)")
    return folder


def load_transformer(pretrained: str | Path | None = None, transformer: dict | None = None,
                     dtype: str | None = None):
    """A `diffusers.WanTransformer3DModel`: from the local folder `pretrained`, or built at random
    from the config kwargs `transformer` (exactly one). `dtype`: e.g. "bfloat16"; None = float32."""
    from diffusers import WanTransformer3DModel

    if (pretrained is None) == (transformer is None):
        raise ValueError("give exactly one of pretrained (a local diffusers folder) or transformer "
                         "(WanTransformer3DModel kwargs for a random model)")
    if pretrained is not None:
        folder = str(transformer_folder(pretrained))
        if dtype is not None:  # diffusers keeps its norms and embeddings in float32
            return WanTransformer3DModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
        model = WanTransformer3DModel.from_pretrained(folder)
        return model if all(p.dtype == torch.float32 for p in model.parameters()) else model.float()
    model = WanTransformer3DModel(**transformer)
    return model if dtype is None else model.to(getattr(torch, dtype))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class WanVideoModel(SparsityKnobs, nn.Module):
    """A diffusers Wan transformer predicting the flow-matching velocity, with VSA in its
    self-attention (see the module docstring). `transformer`: the diffusers model (its weights are
    the model's `transformer.*`); `gates`: VSA's gates G_c (`gates.*`; given: trained ones, e.g.
    `load_gates`; None: zero-initialised), none for other attention."""

    blocks_compiled = False  # VideoDiT's flag, read by the training module (compile_blocks)

    def __init__(self, cfg: WanConfig, transformer, impl: str | None = None,
                 gates: nn.ModuleList | None = None):
        super().__init__()
        self.cfg = cfg
        self.transformer = transformer
        self.handle = None
        self.gates: nn.ModuleList | None = None
        backend = BACKENDS[cfg.attention]
        if cfg.attention != "full":
            options = dict(cfg.attention_options)
            if backend.needs_sparsity:
                self.gates = wan_gates(transformer) if gates is None else gates
                options = {"topk": cfg.topk} if cfg.topk is not None else {"sparsity": cfg.sparsity or 0.0}
            self.handle = apply_sparse_attention(transformer, cfg.attention, tile=cfg.tile, impl=impl,
                                                 gates=self.gates, **options)
        if cfg.activation_checkpointing:
            transformer.enable_gradient_checkpointing()
        emb = None  # [L, text_dim]: the empty prompt's embedding (not saved: its file is the source)
        if cfg.null_text is not None:
            emb, _ = load_null_text(cfg.null_text)
            if emb.shape[1] != cfg.text_dim:
                raise ValueError(f"the null text {cfg.null_text} is {emb.shape[1]} wide but the Wan transformer's "
                                 f"text_dim is {cfg.text_dim}; write it with the model's text encoder")
        self.register_buffer("null_text_emb", emb, persistent=False)
        self._sparsity, self._topk = cfg.sparsity, cfg.topk
        self.train()  # like any new module (diffusers' from_pretrained returns its model in eval mode)

    def compile_blocks(self, **options) -> None:
        """torch.compile every diffusers Wan block in place (`nn.Module.compile`), our attention
        processor inside: norms, RoPE, modulation and gating fuse around the matmuls and the
        attention op. Parameter names and the state dict are unchanged. Default options as
        VideoDiT.compile_blocks: fullgraph=True, dynamic=False. A new sparsity (a staircase step)
        is a new graph, once."""
        if options.get("mode") in ("reduce-overhead", "max-autotune"):
            # A graphed block's output buffer is overwritten by the next replay while diffusers'
            # block loop still reads it (VideoDiT clones between blocks; diffusers' loop cannot).
            raise ValueError(f"module.compile_mode={options['mode']} (CUDA graphs) is not supported for "
                             "the Wan model; use module.compile_mode=null")
        compile_in_place(self.transformer.blocks, **options)
        self.blocks_compiled = True

    # ---- sparsity (set by the staircase schedule) --------------------------------------------

    def sparsity_changed(self) -> None:
        """Hand the current top-k (wins) or sparsity to the VSA processors."""
        if self.handle is not None and self.handle.core.selects:
            if self._topk is not None:
                self.handle.core.set_sparsity(topk=self._topk)
            elif self._sparsity is not None:
                self.handle.core.set_sparsity(sparsity=self._sparsity)

    # ---- conditioning ------------------------------------------------------------------------

    def null_text_like(self, text: torch.Tensor) -> torch.Tensor:
        """The null text in `text`'s shape [B, L, D]: the empty prompt's embedding (`null_text`, cut
        or zero-padded to L tokens, as the pipeline pads), or zeros when the model has none."""
        if self.null_text_emb is None:
            return torch.zeros_like(text)
        null = self.null_text_emb[:text.shape[1]].to(text)
        null = torch.cat([null, null.new_zeros(text.shape[1] - null.shape[0], null.shape[1])])
        return null.expand_as(text)

    def null_condition(self, cond: dict) -> dict:
        """The unconditional counterpart of `cond` for classifier-free guidance: the null text
        (`null_text_like`: what `cond_dropout` trains, and what diffusers' pipeline guides against
        by default, the empty negative prompt)."""
        null = {}
        for key, value in cond.items():
            if key == "text":
                null[key] = None if value is None else self.null_text_like(value)
            elif key == "text_mask":
                null[key] = None if value is None else torch.ones_like(value)
            elif value is not None:
                raise ValueError(f"unknown condition {key!r}; the Wan model takes text, text_mask")
        return null

    def _check_inputs(self, x, t, text, text_mask, labels) -> None:
        cfg = self.cfg
        if labels is not None:
            raise ValueError("labels given but Wan is text-conditioned (num_classes=0); pass text embeddings")
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be Wan latents [B, C={cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}] (one time in [0, 1] per sample), got {tuple(t.shape)}")
        if text is None:
            raise ValueError(f"Wan cross-attends to text: pass text=[B, L, {cfg.text_dim}] (text encoder "
                             "embeddings, e.g. UMT5's, written into the latent shards)")
        if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text must be [B={x.shape[0]}, L, text_dim={cfg.text_dim}] (the Wan "
                             f"transformer's text_dim), got {tuple(text.shape)}; encode the captions "
                             "with the text encoder the transformer was trained with")
        if text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool):
            raise ValueError(f"text_mask must be a bool tensor [B, L] = {tuple(text.shape[:2])}, got "
                             f"{text_mask.dtype} {tuple(text_mask.shape)}")

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v = noise - x0 [B, C, T, H, W] at times t [B] in [0, 1]. Padding text tokens
        (text_mask False) are zeroed, as diffusers' Wan pipeline pads its prompt embeddings;
        `cond_drop` (or, in training, `cfg.cond_dropout`) replaces a sample's text by the null text."""
        self._check_inputs(x, t, text, text_mask, labels)
        self.cfg.token_grid(x.shape[2:])
        drop = cond_drop
        if drop is None and self.training and self.cfg.cond_dropout > 0:
            drop = torch.rand(x.shape[0], device=x.device) < self.cfg.cond_dropout
        if text_mask is not None:
            text = text * text_mask[..., None].to(text.dtype)
        if drop is not None:
            text = torch.where(drop[:, None, None], self.null_text_like(text), text)
        dtype = self.transformer.patch_embedding.weight.dtype  # (diffusers keeps some modules in fp32)
        out = self.transformer(hidden_states=x.to(dtype), timestep=t * TIMESTEP_SCALE,
                               encoder_hidden_states=text.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    # ---- saving ------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, **kwargs) -> Path:
        """Write the finetuned transformer as a diffusers folder (`save_pretrained`: loadable with
        `WanTransformer3DModel.from_pretrained`) plus, for VSA, the trained gates and settings
        (`vsa_gates.safetensors`, `vsa_attention.json`) that
        `vsa.integrations.diffusers.load_sparse_attention(transformer, folder)` installs."""
        folder = Path(folder)
        self.transformer.save_pretrained(str(folder), **kwargs)  # the processors hold no weights
        if self.gates is not None:
            save_sparse_attention(folder, self.transformer, self.handle)
        return folder


def build_wan(pretrained: str | None = None, transformer: dict | None = None,
              in_channels: int | None = None, attention: str = "vsa",
              attention_options: dict | None = None, tile=(4, 4, 4), sparsity: float | None = 0.875,
              topk: int | None = None, cond_dropout: float = 0.0, null_text: str | None = None,
              activation_checkpointing: bool = False,
              dtype: str | None = None, impl: str | None = None, patch=None, num_classes: int = 0,
              tile_order: str = "cubes", text_dim: int = 0, prediction: str = "velocity",
              name: str | None = None) -> WanVideoModel:
    """A `WanVideoModel` from config values (configs/model/wan*.yaml; train.py passes in_channels,
    the data's latent channels, and the shared `model:` fields of configs/train.yaml).

    `pretrained`: a local diffusers folder; `transformer`: WanTransformer3DModel kwargs for a
    random model (tests); exactly one. `patch`: None or the transformer's own patch size (checked).
    `text_dim`: train.yaml's shared field; Wan's text width is its transformer's (0 = take it; another
    value must equal it). `name`: a label (unused). The rest: `WanConfig`.
    """
    if pretrained is None and transformer is None:
        raise ValueError("pretrained is not set: pass the local diffusers folder of the Wan transformer "
                         "to finetune, e.g. pretrained=/models/Wan2.1-T2V-1.3B-Diffusers")
    model = load_transformer(pretrained, None if pretrained is not None else transformer, dtype)
    cfg = WanConfig(transformer=dict(model.config), pretrained=None if pretrained is None else str(pretrained),
                    attention=attention, attention_options=dict(attention_options or {}), tile=tile,
                    sparsity=sparsity, topk=topk, cond_dropout=cond_dropout, null_text=null_text,
                    activation_checkpointing=activation_checkpointing, num_classes=num_classes,
                    tile_order=tile_order, prediction=prediction)
    source = pretrained if pretrained is not None else "the random Wan config"
    if in_channels is not None and int(in_channels) != cfg.in_channels:
        raise ValueError(f"the latents have {in_channels} channels but the Wan transformer ({source}) "
                         f"takes in_channels={cfg.in_channels}; encode the videos with the VAE this "
                         "transformer was trained with (Wan 2.1: the Wan VAE, 16 channels)")
    if patch is not None and int_triple("patch", patch) != cfg.patch:
        raise ValueError(f"patch {tuple(patch)} differs from the Wan transformer's patch_size {cfg.patch}; "
                         "leave model.patch null for Wan")
    if text_dim and int(text_dim) != cfg.text_dim:
        raise ValueError(f"model.text_dim={text_dim} differs from the Wan transformer's text_dim "
                         f"{cfg.text_dim} ({source}); leave model.text_dim at 0 for Wan")
    gates = None
    if pretrained is not None and BACKENDS[cfg.attention].needs_sparsity:
        folder = transformer_folder(pretrained)  # an exported finetune brings its trained gates
        gates = load_gates(model, folder) if (folder / GATES_FILE).is_file() else None
    return WanVideoModel(cfg, model, impl=impl, gates=gates)


def wan_from_config(config: dict, impl: str | None = None) -> WanVideoModel:
    """A `WanVideoModel` of the architecture and attention in `config` (a `WanConfig` as a dict,
    e.g. a training checkpoint's spec), with freshly initialised weights to load a state into
    (the pretrained folder is not read: the checkpoint holds every weight)."""
    # Inference needs no caption dropout, nor its null text (a file of the training machine).
    cfg = WanConfig(**{**config, "cond_dropout": 0.0, "null_text": None})
    return WanVideoModel(cfg, load_transformer(transformer=cfg.transformer), impl=impl)


def is_wan_config(config: dict) -> bool:
    """Whether a checkpoint's model config (its spec's "dit_config") describes a Wan model."""
    return "transformer" in config
