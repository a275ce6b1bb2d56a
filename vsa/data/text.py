"""Captions -> text embeddings with a `transformers` encoder (the T5/UMT5 family Wan uses, or CLIP's
text tower), loaded from a local folder: weights cannot be downloaded on every machine, so nothing
here reaches the network.

    enc = TextEncoder.from_folder("weights/Wan2.1-T2V-1.3B-Diffusers")   # text_encoder/ + tokenizer/
    emb, mask = enc(["a red circle moves left", ""])   # [2, L, D] float, [2, L] bool (True = token)

The folder is either a model folder (config.json + tokenizer files side by side) or a diffusers
pipeline folder (`text_encoder/` and `tokenizer/` subfolders). As Wan's pipeline does, embeddings
are padded to `max_length` tokens with zeros after each caption's last token, so every caption of
a data set has the same [L, D] shape and padding carries no signal even where the mask is ignored;
captions are cleaned as Wan's pipeline cleans prompts, so for a Wan folder the embeddings are the
pipeline's own (`WanPipeline._get_t5_prompt_embeds`, checked in tests/test_wan.py).
The encoder is faithful: "" encodes to its end token, as Wan's negative prompt does (sampling a
VideoDiT maps an empty prompt to its null text instead, `vsa.diffusion.generate`).
`TextEncoder.tiny()` builds a small random one (a byte-level tokenizer and a 2-layer T5 encoder) for
tests and smoke runs; `save()` writes it as a folder that `from_folder` reads back.

`save_null_text` / `load_null_text`: the embedding of the empty prompt (the negative prompt Wan's
pipeline guides against by default), stored beside a folder of latent shards so that a Wan
finetune can drop captions to it for classifier-free guidance.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

NULL_TEXT_FILE = "null_text/null_text.safetensors"  # beside the shards (not a shard: another folder)

# config.json `model_type` -> the transformers class of the encoder-only model.
ENCODERS = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel",
            "clip_text_model": "CLIPTextModel", "clip": "CLIPTextModel"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def clean_caption(text: str) -> str:
    """Wan's prompt cleaning (`WanPipeline`) without its optional ftfy step: HTML entities
    unescaped (twice), runs of whitespace collapsed, ends stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("text encoders need `transformers`: pip install -e '.[diffusers]'") from exc
    return transformers


def _folders(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a model folder or a diffusers pipeline folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder {path} does not exist; pass the local folder of a "
                                "transformers text encoder (config.json + weights + tokenizer files) or of "
                                "a diffusers pipeline (text_encoder/ + tokenizer/)")
    if (path / "text_encoder" / "config.json").is_file():
        model_dir, tok_dir = path / "text_encoder", path / "tokenizer"
    else:
        model_dir = tok_dir = path
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (nor text_encoder/config.json): it is not a "
                                "transformers text encoder folder")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"{model_dir} has config.json but no weights (*.safetensors or *.bin): the "
                                "download is incomplete")
    if not any((tok_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{tok_dir} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); "
                                "copy the tokenizer next to the model or into a tokenizer/ subfolder")
    return model_dir, tok_dir


class TextEncoder(nn.Module):
    """A frozen tokenizer + encoder: `forward(captions) -> (emb [N, max_length, dim], mask [N, max_length])`."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, source: str = "") -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.source = source  # the folder it came from ("" = built in memory)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.d_model)

    @classmethod
    def from_folder(cls, path, max_length: int = 512, dtype: torch.dtype | None = None) -> TextEncoder:
        """Load a model folder or a diffusers pipeline folder (see the module docstring)."""
        transformers = _transformers()
        model_dir, tok_dir = _folders(Path(path))
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        if model_type not in ENCODERS:
            raise ValueError(f"{model_dir}/config.json has model_type={model_type!r}; supported text "
                             f"encoders: {', '.join(sorted(ENCODERS))}")
        model = getattr(transformers, ENCODERS[model_type]).from_pretrained(model_dir, torch_dtype=dtype,
                                                                             local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(model, tokenizer, max_length, source=str(Path(path).resolve()))

    @classmethod
    def tiny(cls, dim: int = 32, layers: int = 2, heads: int = 2, max_length: int = 16,
             seed: int = 0) -> TextEncoder:
        """A small random T5 encoder over a byte-level tokenizer (any text encodes; no files)."""
        transformers = _transformers()
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                         eos_token="</s>", unk_token="<unk>")
        config = transformers.T5Config(vocab_size=len(vocab), d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                                       num_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.T5EncoderModel(config)
        return cls(model, tokenizer, max_length)

    def save(self, path) -> Path:
        """Write model + tokenizer into one folder that `from_folder` reads."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer([clean_caption(c) for c in captions], padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return emb * mask[..., None].to(emb.dtype), mask


def save_null_text(shard_root, encoder: TextEncoder) -> Path:
    """Write `encoder("")` as `<shard_root>/null_text/null_text.safetensors` (`text_emb` [L, D],
    `text_mask` [L]); returns the path."""
    from safetensors.torch import save_file

    emb, mask = encoder([""])
    path = Path(shard_root) / NULL_TEXT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"text_emb": emb[0].float().cpu().contiguous(), "text_mask": mask[0].cpu().contiguous()}, str(path))
    return path


def load_null_text(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_emb [L, D] float32, text_mask [L] bool) written by `save_null_text`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"null text embedding {path} does not exist; scripts/encode_latents.py "
                                f"--text-encoder writes it as <shards>/{NULL_TEXT_FILE}")
    tensors = load_file(str(path))
    if set(tensors) != {"text_emb", "text_mask"} or tensors["text_emb"].dim() != 2:
        raise ValueError(f"{path} is not a null text embedding (text_emb [L, D] + text_mask [L]); "
                         "rewrite it with scripts/encode_latents.py --text-encoder")
    return tensors["text_emb"].float(), tensors["text_mask"].bool()
