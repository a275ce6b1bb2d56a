"""Caption -> text embeddings with a frozen T5-family encoder from a local folder, as diffusers'
Wan pipeline computes its prompt embeddings (for latent shards: scripts/encode_latents.py).

    encoder = TextEncoder("/models/Wan2.1-T2V-1.3B-Diffusers", max_length=512)
    emb, mask = encoder.encode(["a cat runs", "waves at dusk"])   # [2, 512, 4096], [2, 512] bool

Like `WanPipeline._get_t5_prompt_embeds`: captions are cleaned (HTML entities, runs of
whitespace), tokenized with padding to `max_length` (truncated beyond it), encoded with the
attention mask, and the embeddings of the padding tokens set to zero. `mask` is True on the real
tokens. The folder is a pipeline folder with `text_encoder/` and `tokenizer/`, or one folder
holding both the encoder's config.json and the tokenizer's files. Needs `transformers`.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

ENCODER_CLASSES = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}


def clean_caption(text: str) -> str:
    """The Wan pipeline's prompt cleaning without its optional ftfy step: HTML entities
    unescaped (twice), whitespace runs collapsed, ends stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def _folders(path: Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of a pipeline folder or of a single folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder {path} does not exist; pass a local folder (a "
                                "diffusers pipeline folder with text_encoder/ and tokenizer/)")
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder", path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if (path / "config.json").is_file():
        return path, path
    raise FileNotFoundError(f"{path} has neither text_encoder/config.json nor config.json; pass the "
                            "folder of a T5-family text encoder (e.g. a Wan pipeline folder)")


class TextEncoder:
    """A frozen T5 / UMT5 / mT5 encoder and its tokenizer (see the module docstring)."""

    def __init__(self, path: str | Path, max_length: int = 512, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        try:
            import transformers
        except ImportError:
            raise ImportError("the text encoder needs transformers: pip install -e '.[diffusers]'") from None
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (tokens per caption), got {max_length}")
        encoder_dir, tokenizer_dir = _folders(Path(path).expanduser())
        model_type = json.loads((encoder_dir / "config.json").read_text()).get("model_type")
        if model_type not in ENCODER_CLASSES:
            raise ValueError(f"{encoder_dir / 'config.json'} describes a {model_type!r} model; the text "
                             f"encoder must be one of {sorted(ENCODER_CLASSES)} (Wan: umt5)")
        cls = getattr(transformers, ENCODER_CLASSES[model_type])
        self.model = cls.from_pretrained(str(encoder_dir), torch_dtype=dtype, local_files_only=True)
        self.model.requires_grad_(False).eval().to(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.max_length = int(max_length)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, max_length, dim] (zero on padding) and mask [B, max_length] (True = token)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions) or not len(captions):
            raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
        tokens = self.tokenizer([clean_caption(c) for c in captions], padding="max_length",
                                max_length=self.max_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        emb = self.model(ids, mask).last_hidden_state
        mask = mask.bool()
        return emb * mask[..., None].to(emb.dtype), mask
