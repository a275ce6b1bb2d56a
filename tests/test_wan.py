"""Finetuning a pretrained diffusers Wan transformer with VSA (vsa.models.wan): equality with
diffusers' attention, zero-init gates, training steps through the LightningModule and train.py,
saving back to diffusers format, and the errors for bad weights and data. CPU, a tiny random Wan."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from compiled_check import assert_compiled_matches_eager  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from vsa.config import ConfigError  # noqa: E402
from vsa.data import write_latent_shard  # noqa: E402
from vsa.integrations.diffusers import load_sparse_attention  # noqa: E402
from vsa.models.wan import build_wan, transformer_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
TILE = (2, 4, 4)


def tiny(sparsity=0.0, **kwargs):
    torch.manual_seed(0)
    return build_wan(transformer=TINY, in_channels=4, tile=TILE, sparsity=sparsity, **kwargs)


def inputs(batch=2, shape=(3, 10, 14), text_len=7, seed=0):
    """Latents of a ragged token grid (3 x 5 x 7 in tiles of (2, 4, 4)), times, text."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *shape, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, text_len, 32, generator=gen))


def dense(model, x, t, text):
    """The same transformer with diffusers' own attention processors."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    plain = copy.deepcopy(model.transformer)
    for block in plain.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    return plain(x, t * 1000, text, return_dict=False)[0]


def perturb_gates(model, scale=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# ---- the model -----------------------------------------------------------------------------------


def test_vsa_at_full_cover_equals_diffusers_attention():
    model = tiny(sparsity=0.0).eval()
    assert model.handle.n_modules == 2 and len(model.gates) == 2  # attn1 of both blocks; attn2 dense
    x, t, text = inputs()
    with torch.no_grad():
        out = model(x, t, text=text)
        ref = dense(model, x, t, text)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert model.handle.grid == (3, 5, 7)


def test_zero_gates_give_the_dense_output_exactly_and_learn():
    model = tiny(sparsity=0.0).eval()
    assert all(bool((p == 0).all()) and p.requires_grad for p in model.gates.parameters())
    x, t, text = inputs()
    with torch.no_grad():
        gated = model(x, t, text=text)
        processors = [block.attn1.processor for block in model.transformer.blocks]
        for processor in processors:
            processor.gate = None
        ungated = model(x, t, text=text)  # O_f alone: what a processor without gates computes
        for processor, gate in zip(processors, model.gates, strict=True):
            processor.gate = gate
    assert torch.equal(gated, ungated)  # O_c * 0 + O_f = O_f, bit for bit

    # The gates get gradients at step 0, and moving them mixes the coarse stage in.
    model.train()
    model(x, t, text=text).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gates.parameters())
    perturb_gates(model)
    with torch.no_grad():
        assert (model.eval()(x, t, text=text) - gated).abs().max() > 1e-4


def test_sparsity_is_settable_and_reaches_the_processors():
    model = tiny(sparsity=0.0).eval()
    x, t, text = inputs()
    with torch.no_grad():
        full = model(x, t, text=text)
        model.sparsity = 0.75
        assert model.handle.core.sparsity == 0.75
        sparse = model(x, t, text=text)
        assert (sparse - full).abs().max() > 1e-4
        # A deep copy (Lightning's EMA) has its own processors, grid hook and sparsity.
        twin = copy.deepcopy(model)
        twin.sparsity = 0.0
        torch.testing.assert_close(twin(x, t, text=text), full)
        torch.testing.assert_close(model(x, t, text=text), sparse)
        model.topk = 2  # an explicit top-k wins over sparsity
        assert model.handle.core.topk == 2 and model.handle.core.sparsity is None


def test_gated_vsa_on_the_triton_kernel_matches_the_torch_path(kernel_device):
    """Forward and the gates' / weights' gradients: the Triton kernels (the interpreter on a
    CPU-only machine) against the pure-torch path, at sparsity 0.5 with non-zero gates."""
    outputs = {}
    for impl in ("torch", "triton"):
        model = tiny(sparsity=0.5, impl=impl).to(kernel_device)
        perturb_gates(model)
        x, t, text = (a.to(kernel_device) for a in inputs(batch=1, shape=(2, 16, 16)))  # 4 tiles
        out = model(x, t, text=text)
        out.square().mean().backward()
        outputs[impl] = (out.detach(), model.gates[0].weight.grad, model.transformer.blocks[0].attn1.to_q.weight.grad)
    for ref, got in zip(outputs["torch"], outputs["triton"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_the_flop_formula_counts_the_wan_model():
    """vsa.training.flops reads the WanConfig like a DiTConfig (the module logs FLOPs with it):
    within 0.1% of torch's FlopCounterMode. The text cross-attention runs in diffusers' SDPA,
    which the counter does not see on the CPU: added from the formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from vsa.training.flops import forward_flops

    model = tiny(sparsity=0.0).eval()
    x, t, text = inputs(batch=1, shape=(4, 16, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, text=text)
    flops = forward_flops(model.cfg, (4, 16, 16), text_len=7, sparsity=model.sparsity)
    assert flops.params_per_token == 266240  # incl. the gates: one width^2 projection per block
    assert abs(counter.get_total_flops() + flops.cross_attention - flops.forward) < 1e-3 * flops.forward


def test_a_few_finetuning_steps_lower_the_loss():
    """Through VideoDiffusionModule.training_step under a Lightning Trainer, on a fixed batch with
    fixed times and noise (the module's per-step draws pinned), at sparsity 0.5."""
    import lightning as L
    from torch.utils.data import DataLoader

    from vsa.diffusion import flow_matching_loss
    from vsa.training import VideoDiffusionModule

    model = tiny(sparsity=0.5)
    x0, t, text = inputs(batch=4, shape=(2, 8, 8), seed=3)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    module = VideoDiffusionModule(model, data_key="latents", latent_shape=list(x0.shape[1:]),
                                  optimizer={"lr": 1e-3}, timesteps={"shift": 3.0})
    module.sample_draws = lambda x, batch_idx: (t, noise, torch.zeros(4, dtype=torch.bool))

    def loss() -> float:
        with torch.no_grad():
            value = float(flow_matching_loss(model.eval(), x0, t, noise, text=text))
        model.train()
        return value

    before = loss()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([{"latents": x0, "text_emb": text}] * 8, batch_size=None))
    after = loss()
    assert after < 0.8 * before, (before, after)
    assert any(p.abs().sum() > 0 for p in model.gates.parameters())  # the gates trained too
    assert module.flops_per_batch > 0


# ---- saving back to diffusers --------------------------------------------------------------------


def test_save_then_diffusers_from_pretrained_gives_the_same_outputs(tmp_path):
    from diffusers import WanTransformer3DModel

    model = tiny(sparsity=0.5).eval()
    perturb_gates(model)  # as if trained
    x, t, text = inputs()
    with torch.no_grad():
        ref = model(x, t, text=text)
    folder = model.save_pretrained(tmp_path / "out")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "vsa_gates.safetensors",
            "vsa_attention.json"} <= {p.name for p in folder.iterdir()}

    loaded = WanTransformer3DModel.from_pretrained(str(folder)).eval()  # plain diffusers: dense
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t * 1000, text, return_dict=False)[0], dense(model, x, t, text))
        with load_sparse_attention(loaded, folder) as handle:
            assert handle.core.sparsity == 0.5 and handle.core.tile == TILE
            out = loaded(x, t * 1000, text, return_dict=False)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        with load_sparse_attention(loaded, folder, sparsity=0.0):  # another sparsity, same gates
            assert not torch.allclose(loaded(x, t * 1000, text, return_dict=False)[0], out, atol=1e-4)

    # And back into training: build_wan(pretrained=...) loads the saved transformer and its gates.
    again = build_wan(pretrained=str(folder), in_channels=4, tile=TILE, sparsity=0.5)
    assert again.training and all(m.training for m in again.modules())  # ready to train
    again.eval()
    assert all(torch.equal(a, b) for a, b in zip(again.gates.parameters(), model.gates.parameters(), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, text=text), ref, rtol=1e-5, atol=1e-5)
    # In bfloat16 (model.dtype: diffusers keeps its norms and embeddings in float32): close.
    half = build_wan(pretrained=str(folder), in_channels=4, tile=TILE, sparsity=0.5, dtype="bfloat16").eval()
    assert half.gates[0].weight.dtype == half.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (half(x, t, text=text) - ref).abs().max() < 0.02 * ref.abs().max()


# ---- train.py ------------------------------------------------------------------------------------


def write_shards(root: Path, n=8, text_dim=32, channels=4, with_text=True) -> Path:
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(n, 5, text_dim, generator=gen) if with_text else None
    write_latent_shard(root / "shard-00000.safetensors", torch.randn(n, channels, 2, 8, 8, generator=gen),
                       text_emb=text)
    return root


def compose_train(tmp_path: Path, run_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path / run_name}",
                                           f"run_name={run_name}", *overrides])


def run_train(tmp_path: Path, run_name: str, overrides: list[str]):
    from vsa.training import train

    return train(compose_train(tmp_path, run_name, overrides))


QUICK = ["experiment=wan_vsa_finetune", "model=wan_tiny", "logger=csv", "data.datamodule.num_workers=0",
         "data.datamodule.val_size=0", "data.datamodule.batch_size=2", "trainer=cpu",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.speed=null"]


def test_the_experiment_is_the_papers_recipe():
    cfg = compose_train(Path("/tmp/vsa-wan-config-test"), "c", ["experiment=wan_vsa_finetune", "data.root=/x"])
    assert cfg.pretrained is None and cfg.model._target_ == "vsa.models.wan.build_wan"
    assert cfg.attention.name == "vsa" and cfg.attention.options.gates == "adapt"
    assert cfg.module.timesteps.shift == 3.0  # Wan's flow shift (480p)
    from hydra.utils import instantiate

    schedule = instantiate(cfg.callbacks.sparsity_schedule)
    assert schedule.value(0) == 0.0 and schedule.value(10**9) == 0.875


def test_the_experiment_finetunes_through_train_py_with_the_staircase(tmp_path):
    import csv

    shards = write_shards(tmp_path / "shards")
    overrides = QUICK + [f"data.root={shards}", "trainer.log_every_n_steps=1", "module.lr_schedule.warmup_steps=1",
                         "callbacks.sparsity_schedule.increment=0.25", "callbacks.sparsity_schedule.interval=1"]
    run_train(tmp_path, "wan", overrides + ["trainer.max_steps=3"])

    def sparsity_log() -> list[float]:
        rows = []
        for path in (tmp_path / "wan" / "csv").glob("version_*/metrics.csv"):
            with open(path, newline="") as f:
                rows += [row for row in csv.DictReader(f) if row.get("train/sparsity")]
        return [float(r["train/sparsity"]) for r in sorted(rows, key=lambda r: int(r["step"]))]

    assert sparsity_log() == [0.0, 0.25, 0.5]
    run_train(tmp_path, "wan", overrides + ["trainer.max_steps=4"])  # resumes from last.ckpt
    assert sparsity_log() == [0.0, 0.25, 0.5, 0.75]
    ckpt = torch.load(tmp_path / "wan" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("model.gates.") for k in ckpt["state_dict"])
    assert ckpt["vsa"]["dit_config"]["transformer"]["num_layers"] == 2

    # scripts/export_wan.py: the run's checkpoint -> a diffusers folder + gates, same outputs.
    import importlib.util

    from diffusers import WanTransformer3DModel

    from vsa.checkpoint import load_model

    spec = importlib.util.spec_from_file_location("export_wan", REPO / "scripts" / "export_wan.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "wan"), str(tmp_path / "export")]) == 0
    model, sampling_spec = load_model(tmp_path / "wan")
    assert model.sparsity == sampling_spec["sparsity"] == 0.75  # where the staircase had got to
    transformer = WanTransformer3DModel.from_pretrained(str(tmp_path / "export")).eval()
    x, t, text = inputs(shape=(2, 8, 8))
    with torch.no_grad(), load_sparse_attention(transformer, tmp_path / "export") as handle:
        assert handle.core.sparsity == 0.75
        torch.testing.assert_close(transformer(x, t * 1000, text, return_dict=False)[0],
                                   model(x, t, text=text), rtol=1e-5, atol=1e-5)

    # sample.py samples the finetune, prompts embedded by a text encoder of the transformer's width.
    pytest.importorskip("transformers")
    from vsa.sampling import sample

    encoder = tiny_text_encoder(tmp_path / "pipe")

    def sample_cfg(name: str, *extra: str):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            return compose("sample", overrides=[f"ckpt_path={tmp_path / 'wan'}", f"output_dir={tmp_path / name}",
                                                "paths.log_dir=/unused", "paths.output_dir=/unused",
                                                "num_videos=2", "steps=2", *extra])

    result = sample(sample_cfg("s", "prompt=a red frame", f"text_encoder={encoder}", "text_max_length=8"))
    latents = torch.load(result["latents"], weights_only=True)
    assert latents.shape == (2, 4, 2, 8, 8) and torch.isfinite(latents).all() and len(result["videos"]) == 2
    with pytest.raises(ConfigError, match="text_encoder=PATH"):
        sample(sample_cfg("s2", "prompt=a red frame"))
    with pytest.raises(ConfigError, match="attention= and tile= swaps are for VideoDiT"):
        sample(sample_cfg("s3", "prompt=a red frame", f"text_encoder={encoder}", "tile=[2,4,4]"))


FSDP_ONE_GPU = [o for o in QUICK if o != "trainer=cpu"] + [
    "trainer=fsdp", "trainer.devices=1", "callbacks.ema=null", "callbacks.sample_videos=null",
    "model.activation_checkpointing=true", "trainer.max_steps=3"]


def test_the_fsdp_overrides_compose():
    """The GPU test below composes (on any machine): Lightning's FSDP over one device, one unit
    per WanTransformerBlock, activation checkpointing."""
    cfg = compose_train(Path("/tmp/vsa-wan-config-test"), "f", FSDP_ONE_GPU + ["data.root=/x"])
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.FSDPStrategy"
    assert cfg.trainer.devices == 1 and cfg.model.activation_checkpointing is True
    assert cfg.callbacks.ema is None and cfg.callbacks.sample_videos is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Lightning's FSDP)")
def test_fsdp_finetune_with_activation_checkpointing_on_one_gpu(tmp_path):
    """trainer=fsdp on one GPU with activation checkpointing and VSA on the Triton kernels: 3 steps
    through train.py, then the full (gathered) checkpoint loads into a plain model."""
    from vsa.checkpoint import load_model

    shards = write_shards(tmp_path / "shards")
    run_train(tmp_path, "fsdp", FSDP_ONE_GPU + [f"data.root={shards}"])
    ckpt = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert any(k.startswith("model.gates.") for k in ckpt["state_dict"])
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    model, _ = load_model(tmp_path / "fsdp")
    x, t, text = inputs(shape=(2, 8, 8))
    with torch.no_grad():
        assert torch.isfinite(model(x, t, text=text)).all()


# ---- errors --------------------------------------------------------------------------------------


def test_missing_or_incomplete_weight_folders_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        transformer_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json"):
        transformer_folder(empty)
    model = tiny()
    folder = model.save_pretrained(tmp_path / "pipe" / "transformer")
    assert transformer_folder(tmp_path / "pipe") == folder  # a pipeline folder: its transformer/
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has config.json but no weights: expected "
                                                r"diffusion_pytorch_model.safetensors"):
        build_wan(pretrained=str(tmp_path / "pipe"))
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "moved.safetensors").rename(folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"incomplete: .* missing: diffusion_pytorch_model-00002"):
        build_wan(pretrained=str(folder))
    with pytest.raises(FileNotFoundError, match="no vsa_attention.json"):
        load_sparse_attention(model.transformer, empty)


def test_data_that_does_not_fit_the_transformer_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"latents have 16 channels but the Wan transformer .* in_channels=4"):
        build_wan(transformer=TINY, in_channels=16)
    model = tiny()
    x, t, text = inputs()
    with pytest.raises(ValueError, match=r"text must be \[B=2, L, text_dim=32\] .* got \(2, 7, 16\)"):
        model(x, t, text=text[..., :16])
    with pytest.raises(ValueError, match="Wan cross-attends to text"):
        model(x, t)

    cases = {"channels": (write_shards(tmp_path / "c", channels=16), r"model: the latents have 16 channels"),
             "text_dim": (write_shards(tmp_path / "d", text_dim=16),
                          r"data: the data's text embeddings are 16 wide but the model's text_dim is 32"),
             "no_text": (write_shards(tmp_path / "n", with_text=False),
                         r"data: the model cross-attends to text \(text_dim=32\) but .* no text_emb")}
    for name, (shards, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            run_train(tmp_path, name, QUICK + [f"data.root={shards}", "trainer.max_steps=1"])
    with pytest.raises(ConfigError, match=r"model: pretrained is not set: .* pretrained=/"):
        run_train(tmp_path, "p", QUICK + ["model=wan", f"data.root={shards}"])
    with pytest.raises(ConfigError, match=r"gates=adapt"):
        run_train(tmp_path, "g", QUICK + [f"data.root={shards}", "attention.options.gates=pretrain"])


# ---- text embeddings for the shards --------------------------------------------------------------


def tiny_text_encoder(folder: Path) -> Path:
    """A random 1-layer UMT5 encoder (32 wide) and a word-level tokenizer, as in a pipeline folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", "a", "red", "green", "frame", "cat"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    UMT5EncoderModel(config).save_pretrained(str(folder / "text_encoder"))
    return folder


def test_text_embeddings_are_the_wan_pipelines(tmp_path):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from diffusers import WanPipeline

    from vsa.data.text import TextEncoder

    folder = tiny_text_encoder(tmp_path / "pipe")
    encoder = TextEncoder.from_folder(folder, max_length=8)
    captions = ["a  red &amp; frame", "cat"]
    emb, mask = encoder(captions)
    assert emb.shape == (2, 8, 32) and mask.sum(1).tolist() == [5, 2]  # words + </s> ("&" is <unk>)
    pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model)
    ref = WanPipeline._get_t5_prompt_embeds(pipe, captions, max_sequence_length=8, device=torch.device("cpu"),
                                            dtype=torch.float32)
    torch.testing.assert_close(emb, ref)
    with pytest.raises(FileNotFoundError, match=r"no config.json \(nor text_encoder/config.json\)"):
        TextEncoder.from_folder(tmp_path)


def test_caption_dropout_and_guidance_use_the_empty_prompts_embedding(tmp_path, write_clip):
    """encode_latents writes the empty prompt's embedding beside the shards; a Wan model with
    cond_dropout drops captions to it (padded to the batch's length), and guides against it."""
    pytest.importorskip("transformers")
    import importlib.util

    from vsa.data.text import NULL_TEXT_FILE, TextEncoder, load_null_text

    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "a.mp4")
    (videos / "metadata.jsonl").write_text(json.dumps({"file_name": "a.mp4", "caption": "a red frame"}))
    spec = importlib.util.spec_from_file_location("encode_latents", REPO / "scripts" / "encode_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    encoder = tiny_text_encoder(tmp_path / "pipe")
    shards = tmp_path / "shards"
    assert script.main(["--src", str(videos), "--dst", str(shards), "--codec", "space_to_depth", "--frames", "4",
                        "--height", "16", "--width", "16", "--backend", "av", "--text-encoder", str(encoder),
                        "--text-max-length", "6"]) == 0
    null_emb, null_mask = load_null_text(shards / NULL_TEXT_FILE)
    ref, ref_mask = TextEncoder.from_folder(encoder, max_length=6)([""])
    torch.testing.assert_close(null_emb, ref[0])
    assert null_mask.tolist() == ref_mask[0].tolist() == [True] + [False] * 5  # </s> only
    assert len(list(shards.glob("*.safetensors"))) == 1  # the null text is not read as a shard

    with pytest.raises(ValueError, match="model.null_text=.*null_text.safetensors"):
        tiny(cond_dropout=0.5)
    model = tiny(cond_dropout=0.5, null_text=str(shards / NULL_TEXT_FILE)).eval()
    x, t, text = inputs(text_len=7)
    null = torch.cat([null_emb, torch.zeros(1, 32)])[None].expand(2, 7, 32)  # padded to 7 tokens
    with torch.no_grad():
        dropped = model(x, t, text=text, cond_drop=torch.tensor([True, False]))
        expected = model(x, t, text=torch.stack([null[0], text[1]]))
        torch.testing.assert_close(dropped, expected)
        torch.testing.assert_close(model.null_condition({"text": text})["text"], null)
        assert not torch.allclose(model(x, t, text=null), model(x, t, text=torch.zeros_like(text)))
    with pytest.raises(FileNotFoundError, match="encode_latents.py --text-encoder writes it"):
        tiny(cond_dropout=0.5, null_text=str(tmp_path / "none.safetensors"))


@pytest.mark.slow
def test_compiled_blocks_compute_the_same_function():
    """compile_blocks compiles diffusers' Wan blocks with our processor inside, fullgraph (no graph
    break), and keeps the outputs, the gradients and the state dict's names; CUDA-graph modes are
    refused with the fix."""
    eager = tiny(sparsity=0.5)
    perturb_gates(eager)
    compiled = tiny(sparsity=0.5)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x, t, text = inputs()
    assert_compiled_matches_eager(eager, compiled, lambda model: model(x, t, text=text))
    with pytest.raises(ValueError, match="compile_mode=null"):
        tiny().compile_blocks(mode="reduce-overhead")
