"""scripts/bench_attention.py --peers: FastVideo's VSA op timed beside ours (the GPU runs it; these
tests check the wrapping on the CPU with a stand-in op of FastVideo's signature)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_video_sparse_attn(q, k, v, variable_block_sizes, q_variable_block_sizes, topk, block_size=64):
    """FastVideo's signature on [B, H, S, D] (its default block_size 64 means 64x64x64 tokens);
    records what it was given."""
    fake_video_sparse_attn.seen = dict(shapes=[tuple(x.shape) for x in (q, k, v)],
                                       contiguous=all(x.is_contiguous() for x in (q, k, v)),
                                       sizes=variable_block_sizes.tolist(), topk=topk, block_size=block_size)
    return q * 2 + v + 0 * k


def test_peer_runner_feeds_contiguous_bhsd_leaves_and_returns_bshd(bench, monkeypatch):
    monkeypatch.setenv("FASTVIDEO_VSA_TRITON", "0")  # restored after the test
    B, S, H, D = 2, 128, 3, 16
    q, k, v = (torch.randn(B, S, H, D, requires_grad=True) for _ in range(3))
    runner = bench.FastVideoPeer(fake_video_sparse_attn, {"FASTVIDEO_VSA_TRITON": "1"}, topk=1, n_tiles=2)
    runner.bind(q, k, v)
    out = runner(q, k, v)
    seen = fake_video_sparse_attn.seen
    assert seen == dict(shapes=[(B, H, S, D)] * 3, contiguous=True, sizes=[64, 64], topk=1,
                     block_size=(4, 4, 4))
    torch.testing.assert_close(out, q * 2 + v)  # back in [B, S, H, D], the same values
    assert bench.os.environ["FASTVIDEO_VSA_TRITON"] == "1"
    out.sum().backward()  # the gradients reach the runner's own leaves, which the timing resets
    assert all(x.grad is not None for x in runner.grad_inputs) and q.grad is None


def test_peer_runners_add_thunderkittens_only_when_built_and_for_batch_one(bench):
    names = lambda tk: list(bench.peer_runners(fake_video_sparse_attn, {"fastvideo_tk_extension": tk}, 4, 8))
    assert names(False) == ["peer: FastVideo VSA, Triton"]
    assert names(True) == ["peer: FastVideo VSA, Triton", "peer: FastVideo VSA, ThunderKittens"]
    tk = bench.peer_runners(fake_video_sparse_attn, {"fastvideo_tk_extension": True}, 1, 2)[
        "peer: FastVideo VSA, ThunderKittens"]
    q = torch.randn(2, 128, 1, 16)
    with pytest.raises(ValueError, match="batch 1 only"):
        tk.bind(q, q, q)


def test_peers_folder_without_fastvideo_is_refused_with_the_fix(bench, tmp_path):
    with pytest.raises(SystemExit, match="fastvideo-kernel/python/fastvideo_kernel.*git-ignored"):
        bench.load_fastvideo(str(tmp_path))


def test_peers_folder_loads_the_op_and_records_its_commit(bench, tmp_path, monkeypatch):
    """An exported FastVideo tree (no git of its own, inside another repository): the op comes from
    its fastvideo-kernel/python, the commit from its COMMIT file; no TK extension here."""
    package = tmp_path / "fastvideo-kernel" / "python" / "fastvideo_kernel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def video_sparse_attn(*args):\n    return 'peer'\n")
    (tmp_path / "COMMIT").write_text("abc123\n")
    monkeypatch.setattr(bench.sys, "path", list(bench.sys.path))  # restored after the test
    monkeypatch.delitem(bench.sys.modules, "fastvideo_kernel", raising=False)
    op, info = bench.load_fastvideo(str(tmp_path))
    assert op() == "peer" and info == {"fastvideo_commit": "abc123", "fastvideo_tk_extension": False}
    bench.sys.modules.pop("fastvideo_kernel", None)


def test_build_tk_refuses_a_checkout_without_the_thunderkittens_headers(bench, tmp_path):
    source = tmp_path / "fastvideo-kernel" / "csrc" / "attention" / "block_sparse_h100.cu"
    source.parent.mkdir(parents=True)
    source.write_text("// kernel\n")
    with pytest.raises(SystemExit, match="include/tk/include/kittens.cuh is missing.*pinned commit"):
        bench.build_tk(str(tmp_path), load=lambda **kw: None)


def test_build_tk_compiles_for_sm90a_and_fastvideo_imports_the_result(bench, tmp_path, monkeypatch):
    """The cpp_extension call (a stand-in here) gets Hopper's flags, FastVideo's kernel source, our
    binding and the ThunderKittens include paths; FastVideo's own import then finds the module."""
    kernel = tmp_path / "fastvideo-kernel"
    (kernel / "csrc" / "attention").mkdir(parents=True)
    (kernel / "csrc" / "attention" / "block_sparse_h100.cu").write_text("// kernel\n")
    (kernel / "include" / "tk" / "include").mkdir(parents=True)
    (kernel / "include" / "tk" / "include" / "kittens.cuh").write_text("// headers\n")
    package = kernel / "python" / "fastvideo_kernel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def video_sparse_attn(*args):\n    return 'peer'\n")
    monkeypatch.setattr(bench.sys, "path", list(bench.sys.path))
    monkeypatch.delitem(bench.sys.modules, "fastvideo_kernel", raising=False)
    monkeypatch.setitem(bench.sys.modules, "fastvideo_kernel._C", None)  # removed after the test
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(block_sparse_fwd="fwd", block_sparse_bwd="bwd")

    ops = bench.build_tk(str(tmp_path), build_dir=str(tmp_path / "build"), load=fake_load)
    assert seen["name"] == "fastvideo_kernel_ops"
    binding, source = (Path(p) for p in seen["sources"])
    assert source == kernel / "csrc" / "attention" / "block_sparse_h100.cu"
    assert '"block_sparse_fwd"' in binding.read_text() and '"block_sparse_bwd"' in binding.read_text()
    assert seen["extra_include_paths"][0] == str(kernel / "include" / "tk" / "include")
    flags = seen["extra_cuda_cflags"]
    assert {"-std=c++20", "-DKITTENS_HOPPER", "-gencode=arch=compute_90a,code=sm_90a"} <= set(flags)
    assert seen["extra_ldflags"] == ["-lcuda"] and bench.os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    op, info = bench.load_fastvideo(str(tmp_path))
    assert info["fastvideo_tk_extension"] is True
    from fastvideo_kernel._C import fastvideo_kernel_ops
    assert fastvideo_kernel_ops is ops and ops.block_sparse_fwd == "fwd"
    bench.sys.modules.pop("fastvideo_kernel", None)
