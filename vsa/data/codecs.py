"""Codecs between videos [B, C, T, H, W] and the tensors the model is trained on.

- `IdentityCodec`: pixel space, nothing changes.
- `SpaceToDepthCodec(factor=(ft, fh, fw))`: folds each (ft, fh, fw) block of pixels into channels,
  [B, C, T, H, W] -> [B, C*ft*fh*fw, T/ft, H/fh, W/fw]. Weight-free and lossless: `decode` is the
  exact inverse (a pure permutation of elements, so bit-exact).
- `DiffusersVAECodec(path)`: a diffusers `AutoencoderKL` (image VAE, applied frame by frame) or
  `AutoencoderKLWan` (video VAE) loaded from a local folder, with the latent normalisation from its
  config. diffusers is imported only when this codec is built.

    codec = build_codec("space_to_depth", factor=(1, 2, 2))
    z = codec.encode(x); x_again = codec.decode(z)
    codec.latent_shape((3, 16, 64, 64))   # -> (12, 16, 32, 32)

Codecs are `torch.nn.Module`s so `.to(device)` moves a VAE's weights with the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

Shape4 = tuple[int, int, int, int]


def _check_video(x: torch.Tensor, what: str = "video") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [B, C, T, H, W], got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{what} must be 5-D [B, C, T, H, W], got shape {tuple(x.shape)}; "
                         f"add the batch dim with x[None] for a single sample")
    return x


def _check_shape(shape: Sequence[int]) -> Shape4:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be 4 positive ints (C, T, H, W), got {shape}")
    return shape  # type: ignore[return-value]


class IdentityCodec(nn.Module):
    """Pixel space: encode and decode return their input."""

    name = "identity"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _check_video(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return _check_video(z, "latents")

    def latent_shape(self, shape: Sequence[int]) -> Shape4:
        return _check_shape(shape)


class SpaceToDepthCodec(nn.Module):
    """Lossless space(-time)-to-depth folding by `factor` = (ft, fh, fw); an int f means (1, f, f)."""

    name = "space_to_depth"

    def __init__(self, factor: int | Sequence[int] = (1, 2, 2)) -> None:
        super().__init__()
        if isinstance(factor, int) and not isinstance(factor, bool):
            factor = (1, factor, factor)
        try:
            triple = tuple(int(f) for f in factor)
        except TypeError:
            raise TypeError(f"factor must be an int or 3 ints (ft, fh, fw), got {factor!r}") from None
        if len(triple) != 3 or any(f < 1 for f in triple):
            raise ValueError(f"factor must be 3 positive ints (ft, fh, fw), got {factor!r}")
        self.factor: tuple[int, int, int] = triple  # type: ignore[assignment]
        self.fold = math.prod(triple)

    def _check_divisible(self, t: int, h: int, w: int) -> None:
        if t % self.factor[0] or h % self.factor[1] or w % self.factor[2]:
            raise ValueError(f"SpaceToDepthCodec(factor={self.factor}) needs (T, H, W) divisible by "
                             f"{self.factor}, got ({t}, {h}, {w}); choose frames/height/width that are "
                             f"multiples of the factor, or change the factor")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = _check_video(x).shape
        self._check_divisible(T, H, W)
        ft, fh, fw = self.factor
        x = x.reshape(B, C, T // ft, ft, H // fh, fh, W // fw, fw)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fh, fw, T', H', W']: channel-major blocks
        return x.reshape(B, C * self.fold, T // ft, H // fh, W // fw)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        B, Cz, T, H, W = _check_video(z, "latents").shape
        if Cz % self.fold:
            raise ValueError(f"latents have {Cz} channels, not a multiple of {self.fold} = prod(factor="
                             f"{self.factor}); were they encoded with this factor?")
        ft, fh, fw = self.factor
        z = z.reshape(B, Cz // self.fold, ft, fh, fw, T, H, W)
        z = z.permute(0, 1, 5, 2, 6, 3, 7, 4)  # back to [B, C, T', ft, H', fh, W', fw]
        return z.reshape(B, Cz // self.fold, T * ft, H * fh, W * fw)

    def latent_shape(self, shape: Sequence[int]) -> Shape4:
        C, T, H, W = _check_shape(shape)
        self._check_divisible(T, H, W)
        ft, fh, fw = self.factor
        return (C * self.fold, T // ft, H // fh, W // fw)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


_VAE_HINT = ("give the local folder of a diffusers VAE (with config.json and its weights), e.g. "
             "`huggingface-cli download <repo> --include 'vae/*' --local-dir ./weights` and "
             "path='./weights', subfolder='vae'")


class DiffusersVAECodec(nn.Module):
    """A frozen diffusers VAE from a local folder: `AutoencoderKL` (per frame) or `AutoencoderKLWan`.

    Latents are normalised with the VAE's config: per-channel `latents_mean`/`latents_std` when
    present (Wan), else `(z - shift_factor) * scaling_factor`. `sample=False` encodes to the
    posterior mode (deterministic). `frames_per_call` bounds memory for the per-frame image VAE.
    """

    name = "vae"
    SUPPORTED = ("AutoencoderKL", "AutoencoderKLWan")

    def __init__(
        self,
        path: str | Path,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        sample: bool = False,
        frames_per_call: int = 16,
    ) -> None:
        super().__init__()
        try:
            import diffusers
        except ImportError:
            raise ImportError("DiffusersVAECodec needs diffusers: run `pip install diffusers`, then "
                              + _VAE_HINT) from None
        if path is None:
            raise ValueError("DiffusersVAECodec needs `path`: " + _VAE_HINT)
        folder = Path(path).expanduser() / (subfolder or "")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no VAE config at {config_file}; " + _VAE_HINT)
        class_name = json.loads(config_file.read_text()).get("_class_name")
        if class_name not in self.SUPPORTED:
            raise ValueError(f"{config_file} describes a {class_name!r}; DiffusersVAECodec supports "
                             f"{self.SUPPORTED}")
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        cls = getattr(diffusers, class_name)
        self.vae = cls.from_pretrained(str(Path(path).expanduser()), subfolder=subfolder,
                                       torch_dtype=dtype, local_files_only=True)
        self.vae.requires_grad_(False).eval()
        self.is_video_vae = class_name == "AutoencoderKLWan"
        self.sample = sample
        self.frames_per_call = frames_per_call
        cfg = self.vae.config
        if self.is_video_vae:
            # From the architecture (the config's scale_factor_* fields are defaults, not derived).
            downsample = [bool(d) for d in cfg.temperal_downsample]
            self.temporal_factor = 2 ** sum(downsample)
            self.spatial_factor = 2 ** len(downsample) * int(getattr(cfg, "patch_size", None) or 1)
            self.latent_channels = int(cfg.z_dim)
        else:
            self.temporal_factor = 1
            self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
            self.latent_channels = int(cfg.latent_channels)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shift = torch.tensor(mean, dtype=torch.float32)
            scale = 1.0 / torch.tensor(std, dtype=torch.float32)
        else:
            shift = torch.tensor([float(getattr(cfg, "shift_factor", None) or 0.0)])
            scale = torch.tensor([float(getattr(cfg, "scaling_factor", None) or 1.0)])
        self.register_buffer("shift", shift.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, -1, 1, 1, 1), persistent=False)

    def latent_shape(self, shape: Sequence[int]) -> Shape4:
        C, T, H, W = _check_shape(shape)
        self._check_input(T, H, W)
        t = 1 + (T - 1) // self.temporal_factor if self.is_video_vae else T
        return (self.latent_channels, t, H // self.spatial_factor, W // self.spatial_factor)

    def _check_input(self, T: int, H: int, W: int) -> None:
        s, ft = self.spatial_factor, self.temporal_factor
        if H % s or W % s:
            raise ValueError(f"this VAE needs height and width divisible by {s}, got {H}x{W}")
        if self.is_video_vae and (T - 1) % ft:
            example = 1 + ft * max(1, (T - 1) // ft)
            raise ValueError(f"this video VAE needs frames = 1 + {ft}*k (e.g. {example}), got {T}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = _check_video(x).shape
        self._check_input(T, H, W)
        vae_dtype = next(self.vae.parameters()).dtype
        if self.is_video_vae:
            z = self._posterior(x.to(vae_dtype))
        else:
            frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W).to(vae_dtype)
            parts = [self._posterior(chunk) for chunk in frames.split(self.frames_per_call)]
            z = torch.cat(parts)
            z = z.reshape(B, T, *z.shape[1:]).permute(0, 2, 1, 3, 4)
        return ((z.float() - self.shift) * self.scale).to(x.dtype)

    def _posterior(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        return dist.sample() if self.sample else dist.mode()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        B, Cz, T, h, w = _check_video(z, "latents").shape
        if Cz != self.latent_channels:
            raise ValueError(f"latents have {Cz} channels but this VAE expects {self.latent_channels}")
        vae_dtype = next(self.vae.parameters()).dtype
        raw = (z.float() / self.scale + self.shift).to(vae_dtype)
        if self.is_video_vae:
            x = self.vae.decode(raw).sample
        else:
            frames = raw.permute(0, 2, 1, 3, 4).reshape(B * T, Cz, h, w)
            x = torch.cat([self.vae.decode(chunk).sample for chunk in frames.split(self.frames_per_call)])
            x = x.reshape(B, T, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        return x.to(z.dtype)


CODECS: dict[str, type[nn.Module]] = {
    "identity": IdentityCodec,
    "space_to_depth": SpaceToDepthCodec,
    "vae": DiffusersVAECodec,
}


def build_codec(name: str, **kwargs) -> nn.Module:
    """A codec by name: "identity", "space_to_depth" (factor=...) or "vae" (path=..., subfolder=...)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    try:
        return CODECS[name](**kwargs)
    except TypeError as exc:
        if "unexpected keyword" in str(exc) or "positional argument" in str(exc):
            raise TypeError(f"bad arguments for codec {name!r}: {exc}") from None
        raise
