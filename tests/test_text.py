"""Text encoders (vsa.data.text) and caption embeddings in latent shards (scripts/encode_latents.py):
a tiny random T5 encoder saved to a folder stands in for a downloaded UMT5/CLIP. CPU, a few seconds."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="text encoders need transformers (pip install -e '.[diffusers]')")

from vsa.data.latents import LatentShardDataset  # noqa: E402
from vsa.data.text import TextEncoder  # noqa: E402
from vsa.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle moves left", "a blue square waves right", ""]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return TextEncoder.tiny(dim=32, max_length=32).save(tmp_path_factory.mktemp("text_encoder"))


def test_tiny_encoder_pads_with_zeros_and_reloads_identically(encoder_dir, tmp_path):
    enc = TextEncoder.tiny(dim=32, max_length=32)
    emb, mask = enc(CAPTIONS)
    assert emb.shape == (3, 32, 32) and mask.shape == (3, 32) and mask.dtype == torch.bool
    # One token per byte plus </s>: the empty caption still has its end token (never an all-False mask).
    assert mask.sum(1).tolist() == [len(CAPTIONS[0]) + 1, len(CAPTIONS[1]) + 1, 1]
    assert torch.all(emb[~mask] == 0) and torch.all(emb[mask].abs().sum(-1) > 0)
    # A caption's embedding does not depend on the batch it is in (padding is masked out).
    assert torch.allclose(enc(CAPTIONS[:1])[0][0], emb[0], atol=1e-6)
    again = TextEncoder.from_folder(encoder_dir, max_length=32)
    assert again.dim == 32 and torch.equal(again(CAPTIONS)[0], emb) and torch.equal(again(CAPTIONS)[1], mask)
    # A diffusers pipeline folder: text_encoder/ + tokenizer/.
    pipe = tmp_path / "pipe"
    enc.model.save_pretrained(pipe / "text_encoder")
    enc.tokenizer.save_pretrained(pipe / "tokenizer")
    assert torch.equal(TextEncoder.from_folder(pipe, max_length=32)(CAPTIONS)[0], emb)
    long = TextEncoder.from_folder(encoder_dir, max_length=8)(["x" * 40])[1]
    assert long.shape == (1, 8) and bool(long.all())  # truncated to max_length


def test_bad_folders_name_the_problem(encoder_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.from_folder(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(encoder_dir, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights.*incomplete"):
        TextEncoder.from_folder(partial)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(encoder_dir, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        TextEncoder.from_folder(no_tok)
    bert = tmp_path / "bert"
    shutil.copytree(encoder_dir, bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'.*supported"):
        TextEncoder.from_folder(bert)
    with pytest.raises(TypeError, match="list of strings"):
        TextEncoder.tiny()("one caption")


@pytest.fixture
def captioned_dir(tmp_path_factory, write_clip):
    root = tmp_path_factory.mktemp("captioned")
    lines = []
    for i, caption in enumerate(CAPTIONS):
        write_clip(root / f"v{i}.mp4")
        lines.append(json.dumps({"file_name": f"v{i}.mp4", "caption": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _encode_script():
    spec = importlib.util.spec_from_file_location("encode_latents", REPO / "scripts" / "encode_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_encode_latents_stores_caption_embeddings_and_a_text_model_trains_on_them(
        captioned_dir, encoder_dir, tmp_path, capsys):
    script = _encode_script()
    dst = tmp_path / "latents"
    args = ["--src", str(captioned_dir), "--dst", str(dst), "--codec", "space_to_depth", "--frames", "4",
            "--height", "16", "--width", "16", "--shard-size", "2", "--backend", "av",
            "--text-encoder", str(encoder_dir), "--text-max-length", "32"]
    assert script.main(args) == 0
    ds = LatentShardDataset(dst)
    assert len(ds) == 3 and ds.metadata["text_encoder"] == str(encoder_dir.resolve())
    emb, mask = TextEncoder.from_folder(encoder_dir, max_length=32)(CAPTIONS)
    for i in range(3):
        item = ds[i]
        assert item["caption"] == CAPTIONS[i]
        assert torch.allclose(item["text_emb"], emb[i], atol=1e-6) and torch.equal(item["text_mask"], mask[i])

    # A text-conditioned VideoDiT takes a batch of them; a model of another text width is refused.
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ("latents", "text_emb", "text_mask")}
    model = build_model("0.6M", in_channels=12, num_classes=0, text_dim=32)
    out = model(batch["latents"], torch.rand(2), text=batch["text_emb"], text_mask=batch["text_mask"])
    assert out.shape == batch["latents"].shape and torch.isfinite(out).all()
    wrong = build_model("0.6M", in_channels=12, num_classes=0, text_dim=64)
    with pytest.raises(ValueError, match=r"text_dim=64.*project the embeddings or set text_dim"):
        wrong(batch["latents"], torch.rand(2), text=batch["text_emb"], text_mask=batch["text_mask"])


def test_sampling_embeds_prompts_with_the_text_encoder_and_the_empty_prompt_is_the_null_text():
    from vsa.diffusion import generate

    enc = TextEncoder.tiny(dim=32, max_length=32)
    torch.manual_seed(0)
    model = build_model("0.6M", in_channels=4, num_classes=0, text_dim=32)
    with torch.no_grad():  # a fresh model ignores its text (zero-init): perturb every weight
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    shape, kw = (4, 2, 8, 8), dict(steps=2, seed=3)
    a = generate(model, shape, 2, prompts=["a red circle", "a blue square"], text_encoder=enc, **kw)
    b = generate(model, shape, 2, prompts=["a red circle", "a green cross"], text_encoder=enc, **kw)
    assert a.shape == (2, *shape) and torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    # The empty prompt is the null text (not the encoder's "" embedding): guidance changes nothing.
    empty = [generate(model, shape, 2, prompts=["", ""], text_encoder=enc, cfg_scale=s, **kw) for s in (1.0, 4.0)]
    assert torch.allclose(empty[0], empty[1], atol=1e-5)
    with pytest.raises(ValueError, match="text_encoder=PATH"):
        generate(model, shape, 2, prompts=["a", "b"], **kw)
    with pytest.raises(ValueError, match="give prompts, one per video"):
        generate(model, shape, 2, text_encoder=enc, **kw)
    with pytest.raises(ValueError, match="text_dim=32; use the encoder"):
        generate(model, shape, 2, prompts=["a", "b"], text_encoder=TextEncoder.tiny(dim=16), **kw)


def test_encode_latents_text_encoder_needs_captions(encoder_dir, tmp_path, capsys, write_clip):
    root = tmp_path / "plain"
    root.mkdir()
    write_clip(root / "v.mp4")
    args = ["--src", str(root), "--dst", str(tmp_path / "out"), "--codec", "identity", "--frames", "4",
            "--height", "16", "--width", "16", "--backend", "av", "--text-encoder", str(encoder_dir)]
    assert _encode_script().main(args) == 2
    assert "caption" in capsys.readouterr().err
    args[-1] = str(tmp_path / "missing")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "v.mp4", "caption": "hi"}) + "\n")
    assert _encode_script().main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_on_caption_embeddings_then_sample_py_with_prompts(captioned_dir, encoder_dir, tmp_path):
    """encode_latents --text-encoder -> train.py data=latents with a text_dim model (its sampling
    callback embeds prompts with the same encoder) -> sample.py prompt=... text_encoder=PATH."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vsa.sampling import sample
    from vsa.training import ConfigError, train

    shards = tmp_path / "shards"
    assert _encode_script().main([
        "--src", str(captioned_dir), "--dst", str(shards), "--codec", "space_to_depth", "--frames", "4",
        "--height", "16", "--width", "16", "--backend", "av", "--text-encoder", str(encoder_dir),
        "--text-max-length", "32"]) == 0
    configs = str(REPO / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", "model=0.6m", "logger=csv",
            "attention=full", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "module.lr_schedule.warmup_steps=1",
            "callbacks.sample_videos.every_n_steps=2", "callbacks.sample_videos.num_videos=2",
            "callbacks.sample_videos.steps=2", "data=latents", f"data.root={shards}",
            "data.datamodule.batch_size=2",
            "data.datamodule.val_size=1", "data.datamodule.num_workers=0", "data.codec.name=space_to_depth",
            "data.codec.factor=[1,2,2]", "model.num_classes=0", "model.text_dim=32",
            "callbacks.sample_quality=null", "trainer.enable_progress_bar=false",
            "+callbacks.sample_videos.prompts=[a red circle moves left]",
            f"+callbacks.sample_videos.text_encoder={encoder_dir}", "+callbacks.sample_videos.text_max_length=32"])
    with pytest.raises(ConfigError, match="32 wide but the model's text_dim is 64"):
        train(OmegaConf.merge(cfg, {"model": {"text_dim": 64}}))  # stopped before any step
    train(cfg)
    assert len(list((tmp_path / "run" / "samples" / "step_0000004").glob("video_*.mp4"))) == 2

    def run(name: str, *overrides: str):
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            return sample(compose("sample", overrides=[
                f"ckpt_path={tmp_path / 'run'}", f"output_dir={tmp_path / name}", "paths.log_dir=/unused",
                "paths.output_dir=/unused", "num_videos=2", "steps=2", *overrides]))

    result = run("prompted", "prompt=a blue square waves right", f"text_encoder={encoder_dir}", "text_max_length=32")
    assert len(result["videos"]) == 2 and all(Path(p).is_file() for p in result["videos"])
    with pytest.raises(ConfigError, match="text_encoder=PATH"):
        run("no_encoder", "prompt=a blue square")
    with pytest.raises(ConfigError, match="text_encoder.*does not exist"):
        run("missing", "prompt=a blue square", f"text_encoder={tmp_path / 'nowhere'}")
