"""`DiTConfig`: every hyper-parameter of a `VideoDiT`, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vsa.layout import ORDERS, int_triple
from vsa.ops import SUPPORTED_HEAD_DIMS

PREDICTIONS = ("velocity", "x0")  # DiTConfig.prediction
X0_MIN_T = 0.05  # prediction="x0": v = (x_t - x0) / max(t, X0_MIN_T)


@dataclass
class DiTConfig:
    """Architecture of a VideoDiT plus its attention backend.

    Conditioning: `text_dim > 0` gives cross-attention to text embeddings of that width;
    otherwise `num_classes > 0` gives class labels (index `num_classes` is the null class used
    for classifier-free guidance); with neither the model is unconditional (timestep only).
    `cond_dropout` is the training-time probability of replacing a sample's condition by the
    null one (null class, or all-zero text embeddings).
    """

    depth: int = 12
    width: int = 768
    head_dim: int = 64
    mlp_ratio: float = 4.0
    # Kernel (odd, in tokens: one int for t, h and w, or (t, h, w)) of a depthwise 3D convolution
    # over the token grid inside every block's MLP (fc1 -> + conv -> GELU -> fc2; zero-initialised,
    # so a new model computes what it would without it); 0 = none. It gives every token its
    # neighbours directly: the default CPU run draws each object as one moving blob with 3, as
    # scattered 4x4-pixel blocks without (docs/sample_quality.md).
    mlp_conv: int | tuple[int, int, int] = 0
    in_channels: int = 16
    out_channels: int | None = None  # None: same as in_channels
    # What the network's last layer predicts. "velocity": v = noise - x0 directly. "x0": the clean
    # sample x0 (JiT, arXiv 2511.13720); forward() still returns a velocity, (x_t - x0) / t with
    # t clipped below at 0.05, so losses and samplers do not change. x0 lies on the data's
    # low-dimensional structure where v carries the noise. Measured (docs/sample_quality.md): flat
    # colours instead of a velocity model's speckle; in experiment=shapes_wide shape accuracy 0.81
    # instead of 0.65, in the shorter default run lower scores. Needs out_channels == in_channels.
    prediction: str = "velocity"
    patch: tuple[int, int, int] = (1, 2, 2)
    tile: tuple[int, int, int] = (4, 4, 4)
    # "cubes": tiles are boxes of `tile` (ragged at the edges); "curve": groups of the tile's volume
    # along a Z-order curve, all full but the last (vsa.layout; VSA and full attention only).
    tile_order: str = "cubes"
    num_classes: int = 0
    text_dim: int = 0
    # With text_dim: the model embeds captions itself (VideoDiT.embed_captions), one learned
    # text_dim vector per word of this vocabulary, trained with the model; the built-in
    # text-to-video demo (vsa.data.synthetic.CAPTION_WORDS). Empty: the text embeddings come with
    # the data (an encoder's, written into latent shards).
    caption_words: tuple[str, ...] = ()
    cond_dropout: float = 0.1
    rope_theta: float = 10000.0
    attention: str = "full"
    attention_options: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.875  # VSA: fraction of key tiles skipped (the paper's K=32 of 256)
    topk: int | None = None  # VSA: key tiles kept per query tile; overrides sparsity when set
    # Recompute blocks' activations in the backward instead of storing them (training only): less
    # memory for long videos / big models, ~1/3 more compute in the recomputed blocks. True = every
    # block, False or 0 = none, an int n = the first n blocks (spend the memory you have).
    activation_checkpointing: bool | int = False

    def __post_init__(self) -> None:
        self.patch = int_triple("patch", self.patch)
        self.tile = int_triple("tile", self.tile)
        self.attention_options = dict(self.attention_options)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {self.head_dim} is not supported; use one of "
                             f"{SUPPORTED_HEAD_DIMS} (the VSA kernels' head dims)")
        if self.width < self.head_dim or self.width % self.head_dim:
            raise ValueError(f"width {self.width} must be a positive multiple of head_dim "
                             f"{self.head_dim} (width = heads * head_dim)")
        for name in ("depth", "in_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.prediction == "x0" and self.out_channels != self.in_channels:
            raise ValueError(f"prediction='x0' predicts the input itself: out_channels ({self.out_channels}) "
                             f"must equal in_channels ({self.in_channels}); leave out_channels null")
        conv, takes = self.mlp_conv, ("0 (no convolution), an odd kernel size >= 1 in tokens (e.g. 3) or "
                                      "three of them (t, h, w), e.g. [3, 5, 5]")
        if isinstance(conv, (bool, str, bytes, float)):
            raise ValueError(f"mlp_conv must be {takes}; got {conv!r}")
        if isinstance(conv, int):
            if conv < 0 or (conv and conv % 2 == 0):
                raise ValueError(f"mlp_conv must be {takes}; got {conv!r}")
        else:
            conv = self.mlp_conv = int_triple("mlp_conv", conv)
            if any(k % 2 == 0 for k in conv):
                raise ValueError(f"mlp_conv must be {takes}; got {list(conv)}")
        if self.mlp_ratio <= 0 or self.mlp_width < 1:
            raise ValueError(f"mlp_ratio must give a positive MLP width, got {self.mlp_ratio}")
        if self.num_classes < 0 or self.text_dim < 0:
            raise ValueError("num_classes and text_dim must be >= 0 (0 = not used)")
        if self.num_classes and self.text_dim:
            raise ValueError(
                f"the model conditions on text (text_dim={self.text_dim}) or on class labels "
                f"(num_classes={self.num_classes}), not both; set one of them to 0"
            )
        words = self.caption_words
        if isinstance(words, str) or not all(isinstance(w, str) and w and w == w.lower() and " " not in w
                                             for w in words):
            raise ValueError(f"caption_words must be a list of lower-case words without spaces, got {words!r}")
        self.caption_words = tuple(words)
        if len(set(self.caption_words)) != len(self.caption_words):
            raise ValueError("caption_words lists a word twice")
        if self.caption_words and not self.text_dim:
            raise ValueError("caption_words needs text_dim > 0 (the width of the word embeddings)")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        check_sparsity(self.sparsity, self.topk)
        if self.tile_order not in ORDERS:
            raise ValueError(f"unknown tile_order {self.tile_order!r}; choose one of {ORDERS}")
        ac = self.activation_checkpointing
        if not isinstance(ac, (bool, int)) or ac < 0:
            raise ValueError(f"activation_checkpointing must be true/false or a number of blocks >= 0, "
                             f"got {ac!r}")

    @property
    def checkpointed_blocks(self) -> int:
        """How many blocks (the first ones) recompute their activations in the backward."""
        ac = self.activation_checkpointing
        return self.depth if ac is True else min(int(ac), self.depth)

    @property
    def n_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def mlp_conv_kernel(self) -> tuple[int, int, int] | None:
        """The MLP's token-convolution kernel (t, h, w) in tokens, or None without one."""
        return int_triple("mlp_conv", self.mlp_conv, scalar=True) if self.mlp_conv else None

    @property
    def patch_volume(self) -> int:
        return self.patch[0] * self.patch[1] * self.patch[2]

    def token_grid(self, video_shape) -> tuple[int, int, int]:
        """Token grid (T', H', W') of an input of shape (T, H, W) (channels excluded)."""
        shape = int_triple("video shape", video_shape)
        if any(s % p for s, p in zip(shape, self.patch, strict=True)):
            raise ValueError(
                f"video grid (T, H, W) = {shape} is not divisible by the patch {self.patch}; crop "
                "or resize the video (or latent) to a multiple of the patch, or change `patch`"
            )
        return tuple(s // p for s, p in zip(shape, self.patch, strict=True))  # type: ignore[return-value]


def check_sparsity(sparsity: float | None, topk: int | None) -> None:
    """Raise unless sparsity lies in [0, 1) and topk is None or a positive int."""
    if sparsity is not None and not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1) (0 = dense), got {sparsity}")
    if topk is not None and (int(topk) != topk or topk < 1):
        raise ValueError(f"topk must be None or a positive int (key tiles per query tile), got {topk}")


class SparsityKnobs:
    """Mixin: the `sparsity` and `topk` a model's VSA attention uses, set at any time (the
    staircase schedule, a sampling override), validated by `check_sparsity` and then passed on by
    `sparsity_changed()`: a no-op for a model that reads them every call (VideoDiT), a push into
    the attention processors for one that cannot (the Wan model)."""

    _sparsity: float | None = None
    _topk: int | None = None

    @property
    def sparsity(self) -> float | None:
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float | None) -> None:
        check_sparsity(value, None)
        self._sparsity = None if value is None else float(value)
        self.sparsity_changed()

    @property
    def topk(self) -> int | None:
        return self._topk

    @topk.setter
    def topk(self, value: int | None) -> None:
        check_sparsity(None, value)
        self._topk = None if value is None else int(value)
        self.sparsity_changed()

    def sparsity_changed(self) -> None:
        """Called after every change of `sparsity` or `topk`."""
