"""Datasets, codecs and the Lightning DataModule of vsa.

- `SyntheticVideoDataset` (synthetic.py): procedural moving shapes, the default, no download.
- `VideoFolderDataset` (videos.py): a folder of video files decoded with decord2 / PyAV.
- `LatentShardDataset`, `write_latent_shard` (latents.py): precomputed safetensors shards.
- `IdentityCodec`, `SpaceToDepthCodec`, `DiffusersVAECodec`, `build_codec` (codecs.py).
- `VideoDataModule` (datamodule.py): train / fixed-validation loaders.

Names are imported on first use, so `import vsa.data.synthetic` does not pay for Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsa._lazy import lazy_exports

_EXPORTS = {
    "SyntheticVideoDataset": "vsa.data.synthetic",
    "VideoFolderDataset": "vsa.data.videos",
    "UnreadableVideoWarning": "vsa.data.videos",
    "UnreadableVideoError": "vsa.data.decode",
    "read_clip": "vsa.data.decode",
    "LatentShardDataset": "vsa.data.latents",
    "write_latent_shard": "vsa.data.latents",
    "IdentityCodec": "vsa.data.codecs",
    "SpaceToDepthCodec": "vsa.data.codecs",
    "DiffusersVAECodec": "vsa.data.codecs",
    "build_codec": "vsa.data.codecs",
    "VideoDataModule": "vsa.data.datamodule",
}

__all__ = [
    "DiffusersVAECodec",
    "IdentityCodec",
    "LatentShardDataset",
    "SpaceToDepthCodec",
    "SyntheticVideoDataset",
    "UnreadableVideoError",
    "UnreadableVideoWarning",
    "VideoDataModule",
    "VideoFolderDataset",
    "build_codec",
    "read_clip",
    "write_latent_shard",
]

if TYPE_CHECKING:
    from vsa.data.codecs import DiffusersVAECodec, IdentityCodec, SpaceToDepthCodec, build_codec
    from vsa.data.datamodule import VideoDataModule
    from vsa.data.decode import UnreadableVideoError, read_clip
    from vsa.data.latents import LatentShardDataset, write_latent_shard
    from vsa.data.synthetic import SyntheticVideoDataset
    from vsa.data.videos import UnreadableVideoWarning, VideoFolderDataset


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
