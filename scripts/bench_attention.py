"""Attention benchmark on a GPU: dense cuDNN / flash SDPA, FlexAttention, our fine stage, our VSA.

Protocol (docs/benchmarks.md): CUDA-event timing via triton.testing.do_bench (median) after
warm-up, fresh random bf16 inputs, every method on the same inputs in the same process; speedup =
time(dense cuDNN SDPA) / time(method); effective TFLOP/s = FLOPs the method must do / time (sparse:
dense FLOPs x kept fraction; forward 4*B*H*S*S_kv*D, forward+backward 3.5x forward).

    python scripts/bench_attention.py --out docs/results/attention_h100.json
    python scripts/bench_attention.py --sweep --out docs/results/attention_sweep_h100.json
    python scripts/plot_attention.py docs/results/attention_sweep_h100.json   # the PNG

Prints a markdown table last; writes the same rows (plus device, versions, date) as JSON. --sweep
times dense cuDNN, our VSA and FlexAttention (forward; same blocks) over sequence lengths 8K-128K
at 87.5% sparsity and over sparsities 50-95% at 32K tokens (H12, D128, B1).

Peers (--peers DIR, a FastVideo checkout in a git-ignored folder, never committed; docs/benchmarks.md):
FastVideo's whole VSA op (`fastvideo_kernel.video_sparse_attn`: the same mean-pooled coarse stage,
top-K and block-sparse fine stage, output O_c + O_f) on the same values, timed in the same process,
with its Triton fine stage and, where FastVideo's compiled extension imports (`fastvideo_kernel._C`,
built by its fastvideo-kernel/build.sh on a Hopper GPU), its ThunderKittens one (batch 1 only).
A check row gives the peer's output against ours. `--build-tk` compiles that ThunderKittens
kernel here with torch's cpp_extension (Hopper only; it needs DIR/fastvideo-kernel/include/tk, the
ThunderKittens headers at FastVideo's pinned submodule commit) instead of FastVideo's build.

    python scripts/bench_attention.py --peers peers/FastVideo --shapes 0,2 --no-check
    python scripts/bench_attention.py --peers peers/FastVideo --build-tk --shapes 0,2 --no-check

--gluon adds each of our rows again with the Gluon kernels for Hopper (vsa/ops/gluon_hopper.py): the
forward only, the forward and backward, and those with the overlapped forward (KernelOptions
gluon_fwd, gluon_bwd, gluon_overlap), and a check row of the Gluon forward's output against ours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend

from vsa import TileLayout, block_sparse_attention, video_sparse_attention
from vsa.benchmark import bench, rel_err, run_meta, sdpa, write_results
from vsa.ops import coarse_stage, gluon_hopper, kernel_options, resolve_topk, transpose_block_lists
from vsa.ops.reference import block_sparse_attention_reference_grads

SHAPES = [
    # name, B, H, grid (T, H, W), D, tile order
    ("1x12x32768x128", 1, 12, (8, 64, 64), 128, "cubes"),
    ("1x24x65536x128", 1, 24, (16, 64, 64), 128, "cubes"),
    ("2x16x16384x64", 2, 16, (16, 32, 32), 64, "cubes"),
    ("ragged 21x30x52 (32760) H12 D128", 1, 12, (21, 30, 52), 128, "cubes"),
    # the same grid in full 64-token Z-order groups (512 instead of 624 tiles; vsa.layout)
    ("ragged 21x30x52, Z-order groups", 1, 12, (21, 30, 52), 128, "curve"),
]


def with_gluon(fn, backward: bool = False, overlap: bool = False):
    """`fn` to be timed with the fine stage's forward (and `backward`: its backward too) on the Gluon
    kernels for Hopper where they apply: the options (KernelOptions.gluon_fwd / gluon_bwd) ride on
    the function as `vsa_options`, and the timing loop sets them around the forward and the
    backward alike (the backward launches outside `fn`)."""
    def run(q, k, v):
        return fn(q, k, v)
    run.vsa_options = dict(gluon_fwd=True, gluon_bwd=backward, gluon_overlap=overlap)
    return run


def pairwise_selection(B, H, n_tiles, K, device, gen):
    """Random K key tiles per pair of query tiles (one 128-row FlexAttention block = 2 of our tiles),
    so FlexAttention with 128-row query blocks and our 64-row tiles compute exactly the same mask."""
    n_pairs = n_tiles // 2
    scores = torch.rand(B, H, n_pairs, n_tiles, generator=gen, device="cpu").to(device)
    idx = scores.topk(K, dim=-1).indices.sort(-1).values.to(torch.int32)
    return idx, idx.repeat_interleave(2, dim=2).contiguous()


def flex_runner(idx_pairs, S, B, H):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    K = idx_pairs.shape[-1]
    n_kv = S // 64
    cnt = torch.full(idx_pairs.shape[:3], K, dtype=torch.int32, device=idx_pairs.device)
    # from_kv_blocks reads the number of key blocks off the index width: list all n_kv blocks per
    # row, the K selected first (only the first cnt entries are used).
    chosen = torch.zeros(*idx_pairs.shape[:3], n_kv, dtype=torch.bool, device=idx_pairs.device)
    chosen.scatter_(-1, idx_pairs.long(), True)
    full_idx = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    mask = BlockMask.from_kv_blocks(torch.zeros_like(cnt), full_idx, cnt, full_idx,
                                    BLOCK_SIZE=(128, 64), seq_lengths=(S, S))
    # Each shape and tiling is a recompilation: past dynamo's limit (8) it would fall back to the
    # unfused flex_attention, which materialises the [B, H, S, S] scores (32 GB at 2x16x16384).
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                        kernel_options=run.kernel_options)
    # Its default tiles (128 keys wide) do not divide 64-wide key blocks: pin the forward tiles to the
    # mask's blocks; main() moves on to the next backward tiling when one fails to compile.
    fwd = {"BLOCK_M": 128, "BLOCK_N": 64}
    run.options_to_try = [dict(fwd, BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64),
                          dict(fwd, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32),
                          dict(fwd, BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_stages=1)]
    run.kernel_options = run.options_to_try[0]
    return run


class FastVideoPeer:
    """FastVideo's VSA op on [B, S, H, D] inputs, for the benchmark loop. It takes [B, H, S, D]
    contiguous tensors, so `bind` makes its own leaf copies of the shape's inputs once, outside
    the timing; calls ignore the tensors passed and use those (`grad_inputs`: the leaves whose
    gradients the timing loop resets). `env`: FastVideo's backend switches, set at each call."""

    def __init__(self, op, env: dict[str, str], topk: int, n_tiles: int, batch_one: bool = False):
        self.op, self.env, self.topk, self.n_tiles, self.batch_one = op, env, topk, n_tiles, batch_one
        self.grad_inputs = self.sizes = None

    def bind(self, q, k, v) -> None:
        if self.batch_one and q.shape[0] != 1:
            raise ValueError(f"FastVideo's ThunderKittens kernel takes batch 1 only (got {q.shape[0]})")
        self.grad_inputs = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
        self.sizes = torch.full((self.n_tiles,), 64, dtype=torch.int32, device=q.device)

    def __call__(self, q, k, v):
        os.environ.update(self.env)
        # block_size is the tile's (T, H, W): an int b means b x b x b (64 would be 262,144 tokens)
        out = self.op(*self.grad_inputs, self.sizes, self.sizes, self.topk, block_size=(4, 4, 4))
        return out.transpose(1, 2)  # [B, S, H, D], as ours


# The Python binding of FastVideo's two Hopper entry points (its csrc/common_extension.cpp also
# registers kernels this benchmark does not build). Names as FastVideo's Python looks them up.
TK_BINDING = r"""
#include <torch/extension.h>
#include <vector>
std::vector<torch::Tensor> block_sparse_attention_forward(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor q2k_block_sparse_index,
    torch::Tensor q2k_block_sparse_num, torch::Tensor block_size);
std::vector<torch::Tensor> block_sparse_attention_backward(
    torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor o, torch::Tensor l_vec,
    torch::Tensor og, torch::Tensor k2q_block_sparse_index, torch::Tensor k2q_block_sparse_num,
    torch::Tensor block_size);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_fwd", &block_sparse_attention_forward, "FastVideo's ThunderKittens VSA forward (sm_90a)");
  m.def("block_sparse_bwd", &block_sparse_attention_backward, "FastVideo's ThunderKittens VSA backward (sm_90a)");
}
"""
TK_CUDA_FLAGS = ["-O3", "-DNDEBUG", "-std=c++20", "-DKITTENS_HOPPER", "--use_fast_math",
                 "--expt-extended-lambda", "--expt-relaxed-constexpr", "-DTORCH_COMPILE",
                 "-gencode=arch=compute_90a,code=sm_90a"]


def build_tk(path: str, build_dir: str | None = None, load=None):
    """Compile FastVideo's ThunderKittens H100 kernel (fastvideo-kernel/csrc/attention/
    block_sparse_h100.cu) with torch's cpp_extension, and register it where FastVideo's Python
    imports it (`fastvideo_kernel._C.fastvideo_kernel_ops`). Returns the compiled module.
    `load`: torch.utils.cpp_extension.load (a stand-in in tests)."""
    kernel = Path(path) / "fastvideo-kernel"
    source = kernel / "csrc" / "attention" / "block_sparse_h100.cu"
    tk = kernel / "include" / "tk"
    for needed, what in ((source, "FastVideo's kernel source"), (tk / "include" / "kittens.cuh",
                         "the ThunderKittens headers at FastVideo's pinned commit (its include/tk submodule)")):
        if not needed.exists():
            raise SystemExit(f"--build-tk: {needed} is missing: {what}; docs/benchmarks.md, 'Peers', "
                             "says how to fetch it")
    if load is None:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
            raise SystemExit("--build-tk: FastVideo's ThunderKittens kernel needs a Hopper GPU (sm_90a); "
                             "leave --build-tk out to time its Triton kernel only")
        from torch.utils.cpp_extension import load
    build = Path(build_dir) if build_dir else kernel / "build_tk"
    build.mkdir(parents=True, exist_ok=True)
    binding = build / "tk_binding.cpp"
    binding.write_text(TK_BINDING)
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"  # cpp_extension's own -gencode: sm_90a, not sm_90
    ops = load(name="fastvideo_kernel_ops", sources=[str(binding), str(source)],
               extra_include_paths=[str(tk / "include"), str(tk / "prototype")],
               extra_cflags=["-O3", "-std=c++20"], extra_cuda_cflags=TK_CUDA_FLAGS,
               extra_ldflags=["-lcuda"], build_directory=str(build), verbose=False)
    package = types.ModuleType("fastvideo_kernel._C")
    package.fastvideo_kernel_ops = ops
    sys.modules["fastvideo_kernel._C"] = package
    return ops


def load_fastvideo(path: str):
    """FastVideo's VSA op from a checkout at `path`, and what was loaded (commit, whether the TK
    extension imported)."""
    src = Path(path) / "fastvideo-kernel" / "python"
    if not (src / "fastvideo_kernel").is_dir():
        raise SystemExit(f"--peers {path}: no fastvideo-kernel/python/fastvideo_kernel inside; put a "
                         "FastVideo checkout in a git-ignored folder (docs/benchmarks.md, 'Peers')")
    sys.path.insert(0, str(src))
    from fastvideo_kernel import video_sparse_attn

    commit = None  # the folder's COMMIT file (an exported tree), else its own git checkout's HEAD
    if (Path(path) / "COMMIT").exists():
        commit = (Path(path) / "COMMIT").read_text().strip()
    else:
        git = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True)
        lines = git.stdout.split()
        if git.returncode == 0 and Path(lines[0]).resolve() == Path(path).resolve():
            commit = lines[1]  # (not the HEAD of a repository the folder merely sits in)
    try:
        from fastvideo_kernel._C import fastvideo_kernel_ops  # noqa: F401  (TK, built on the GPU)
        has_tk = True
    except ImportError:
        has_tk = False
    return video_sparse_attn, dict(fastvideo_commit=commit, fastvideo_tk_extension=has_tk)


def peer_runners(op, info: dict, topk: int, n_tiles: int) -> dict[str, FastVideoPeer]:
    """{method name: runner}: FastVideo's Triton fine stage, and its TK one when built."""
    runners = {"peer: FastVideo VSA, Triton": FastVideoPeer(
        op, {"FASTVIDEO_VSA_TRITON": "1", "FASTVIDEO_VSA_TK": "0"}, topk, n_tiles)}
    if info["fastvideo_tk_extension"]:
        runners["peer: FastVideo VSA, ThunderKittens"] = FastVideoPeer(
            op, {"FASTVIDEO_VSA_TRITON": "0", "FASTVIDEO_VSA_TK": "1"}, topk, n_tiles, batch_one=True)
    return runners


def accuracy_row(name, grid, D, sparsity, dev, order="cubes") -> dict:
    """bf16 fine stage (with VSA's own selection) vs the float64 reference at a benchmark shape,
    B=1, H=1: forward and all gradients, outputs poisoned with NaN before the launch."""
    layout = TileLayout(grid, device=dev, order=order)
    n = layout.n_tiles
    K = resolve_topk(n, sparsity=sparsity)
    q, k, v = (torch.randn(1, layout.seq_len, 1, D, device=dev).bfloat16() for _ in range(3))
    _, idx = coarse_stage(q, k, v, layout, K, True)
    cnt = torch.full(idx.shape[:3], K, dtype=torch.int32, device=dev)
    do = torch.randn_like(q)
    blob = torch.full((torch.cuda.mem_get_info()[0] // 8,), float("nan"), device=dev)  # poison
    del blob
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = block_sparse_attention(*leaves, layout, idx, cnt)
    out.backward(do)
    ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx, cnt, do.double())
    errs = [rel_err(x, r) for x, r in zip([out, *(x.grad for x in leaves)], ref)]
    row = dict(shape=name, method="accuracy: bf16 fine stage vs float64 (B1 H1)", S=layout.seq_len, D=D,
               topk=K, rel_err_out=errs[0], rel_err_dq=errs[1], rel_err_dk=errs[2], rel_err_dv=errs[3])
    print(f"{name:36s} bf16 rel err o/dq/dk/dv: " + " / ".join(f"{e:.2e}" for e in errs), flush=True)
    return row


def profile_vsa(B, H, grid, D, order, sparsity, dev) -> None:
    """Kernel-level breakdown of one VSA forward+backward (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    layout = TileLayout(grid, device=dev, order=order)
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device=dev, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    g = torch.randn_like(q)
    for _ in range(3):
        video_sparse_attention(q, k, v, layout, sparsity=sparsity).backward(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            video_sparse_attention(q, k, v, layout, sparsity=sparsity).backward(g)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


SWEEP_LENGTHS = [(8, 32, 32), (16, 32, 32), (8, 64, 64), (16, 64, 64), (32, 64, 64)]  # 8K .. 128K
SWEEP_SPARSITIES = [0.5, 0.75, 0.875, 0.9, 0.95]


def sweep_rows(dev, gen, B=1, H=12, D=128) -> list[dict]:
    """Speedups over dense cuDNN vs sequence length (87.5% sparse) and vs sparsity (32K tokens)."""
    points = [("length", grid, 0.875) for grid in SWEEP_LENGTHS]
    points += [("sparsity", (8, 64, 64), s) for s in SWEEP_SPARSITIES]
    cudnn, rows, dense_cache = sdpa(SDPBackend.CUDNN_ATTENTION), [], {}
    for axis, grid, sparsity in points:
        layout = TileLayout(grid, device=dev)
        S, n = layout.seq_len, layout.n_tiles
        K = resolve_topk(n, sparsity=sparsity)
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        if S not in dense_cache:  # dense time does not depend on the sparsity
            dense_cache[S] = (bench(lambda: cudnn(q, k, v)), bench(lambda: cudnn(q, k, v), grad_inputs=[q, k, v]))
        dense_fwd, dense_fb = dense_cache[S]
        vsa = lambda: video_sparse_attention(q, k, v, layout, topk=K)
        fwd, fb = bench(vsa), bench(vsa, grad_inputs=[q, k, v])
        row = dict(axis=axis, S=S, grid=list(grid), sparsity=sparsity, topk=K, n_tiles=n, B=B, H=H, D=D,
                   cudnn_fwd_ms=dense_fwd, cudnn_fwd_bwd_ms=dense_fb, vsa_fwd_ms=fwd, vsa_fwd_bwd_ms=fb,
                   vsa_speedup_fwd=dense_fwd / fwd, vsa_speedup_fwd_bwd=dense_fb / fb)
        try:
            idx_pairs, _ = pairwise_selection(B, H, n, K, dev, gen)
            flex = flex_runner(idx_pairs, S, B, H)
            row["flex_fwd_ms"] = bench(lambda: flex(q, k, v))
            row["flex_speedup_fwd"] = dense_fwd / row["flex_fwd_ms"]
        except Exception as e:  # reported, not fatal
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"{axis:8s} S={S:6d} sparsity={sparsity:.3f}: cuDNN {dense_fwd:7.2f}/{dense_fb:7.2f} ms, VSA "
              f"{fwd:6.2f}/{fb:6.2f} ms = x{row['vsa_speedup_fwd']:.2f}/x{row['vsa_speedup_fwd_bwd']:.2f}, "
              f"Flex fwd x{row.get('flex_speedup_fwd', float('nan')):.2f}", flush=True)
        q = k = v = None
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    ap.add_argument("--no-check", action="store_true", help="skip the bf16-vs-float64 accuracy rows")
    ap.add_argument("--gluon", action="store_true",
                    help="also time our rows with the Gluon forward (KernelOptions.gluon_fwd, Hopper)")
    ap.add_argument("--profile", action="store_true", help="print where VSA fwd+bwd time goes (first shape)")
    ap.add_argument("--sweep", action="store_true", help="speedup vs sequence length and vs sparsity (for the plot)")
    ap.add_argument("--peers", default=None, metavar="DIR",
                    help="a FastVideo checkout (git-ignored): add its VSA op's rows (see the docstring)")
    ap.add_argument("--build-tk", action="store_true",
                    help="with --peers: compile FastVideo's ThunderKittens kernel here (Hopper) for its rows")
    args = ap.parse_args()
    if args.peers is not None and not Path(args.peers).is_dir():
        ap.error(f"--peers {args.peers}: no such folder; fetch FastVideo into a git-ignored folder first")
    if args.build_tk:
        if args.peers is None:
            ap.error("--build-tk needs --peers DIR (the FastVideo checkout whose kernel it compiles)")
        build_tk(args.peers)
        tk_commit = Path(args.peers) / "fastvideo-kernel" / "include" / "tk" / "COMMIT"
    peer_op, peer_info = load_fastvideo(args.peers) if args.peers is not None else (None, {})
    if args.build_tk:
        peer_info["thunderkittens_built_here"] = True
        peer_info["thunderkittens_commit"] = tk_commit.read_text().strip() if tk_commit.exists() else None
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    if args.sweep:
        write_results(args.out, run_meta(dtype="bfloat16", kind="sweep"), sweep_rows(dev, gen))
        return
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = []
    if args.profile:
        profile_vsa(*shapes[0][1:], args.sparsity, dev)
    for name, B, H, grid, D, order in shapes:
        if not args.no_check:
            rows.append(accuracy_row(name, grid, D, args.sparsity, dev, order))
            torch.cuda.empty_cache()
        layout = TileLayout(grid, device=dev, order=order)
        S, n = layout.seq_len, layout.n_tiles
        K = resolve_topk(n, sparsity=args.sparsity)
        kept = K / n
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        dense_fwd = 4 * B * H * S * S * D
        methods = {
            "SDPA cuDNN (dense)": (sdpa(SDPBackend.CUDNN_ATTENTION), 1.0),
            "SDPA flash (dense)": (sdpa(SDPBackend.FLASH_ATTENTION), 1.0),
        }
        if not layout.is_ragged and n % 2 == 0:
            idx_pairs, idx_tiles = pairwise_selection(B, H, n, K, dev, gen)
            cnt = torch.full(idx_tiles.shape[:3], K, dtype=torch.int32, device=dev)
            flex = flex_runner(idx_pairs, S, B, H)
            methods["FlexAttention, same blocks (q128/kv64)"] = (flex, kept)
            methods["ours: fine stage, same blocks"] = (
                lambda q, k, v, i=idx_tiles, c=cnt: block_sparse_attention(q, k, v, layout, i, c), kept)
            with torch.no_grad():  # both compute the same mask: their outputs must agree
                diff = rel_err(block_sparse_attention(q, k, v, layout, idx_tiles, cnt),
                               flex(q, k, v).transpose(1, 2).double())
            print(f"{name:36s} ours vs FlexAttention, same blocks: rel diff {diff:.2e}", flush=True)
            rows.append(dict(shape=name, method="check: ours vs FlexAttention output", rel_diff=diff))
        methods["ours: VSA (coarse + top-k + fine + combine)"] = (
            lambda q, k, v: video_sparse_attention(q, k, v, layout, topk=K), kept)
        if args.gluon:  # the same calls with the forward on the Gluon kernel (vsa/ops/gluon_hopper.py)
            for mname in [m for m in methods if m.startswith("ours:")]:
                methods[f"{mname}, Gluon fwd"] = (with_gluon(methods[mname][0]), kept)
                methods[f"{mname}, Gluon fwd+bwd"] = (with_gluon(methods[mname][0], backward=True), kept)
                methods[f"{mname}, Gluon fwd (overlap)+bwd"] = (
                    with_gluon(methods[mname][0], backward=True, overlap=True), kept)
            with torch.no_grad():
                with kernel_options(gluon_fwd=True):
                    gluon_out = video_sparse_attention(q, k, v, layout, topk=K)
                diff = rel_err(gluon_out, video_sparse_attention(q, k, v, layout, topk=K).double())
            why = gluon_hopper.why_not(q, k, v, layout.offsets, layout.offsets, layout.max_tile_size,
                                    layout.max_tile_size)
            rows.append(dict(shape=name, method="check: ours with the Gluon fwd vs ours, output", rel_diff=diff,
                             gluon_taken=why is None, gluon_why_not=why))
            print(f"{name:36s} Gluon fwd vs Triton fwd: rel diff {diff:.2e} ({why or 'Gluon kernel taken'})",
                  flush=True)
        if peer_op is not None and not layout.is_ragged:  # FastVideo takes full 64-token tiles
            for mname, runner in peer_runners(peer_op, peer_info, K, n).items():
                try:
                    runner.bind(q, k, v)
                    with torch.no_grad():
                        diff = rel_err(runner(q, k, v),
                                       video_sparse_attention(q, k, v, layout, topk=K).double())
                except Exception as e:  # a peer that does not run here is reported, not fatal
                    rows.append(dict(shape=name, method=mname, error=f"{type(e).__name__}: {str(e)[:300]}",
                                     **peer_info))
                    print(name, mname, "ERROR", rows[-1]["error"], flush=True)
                    continue
                rows.append(dict(shape=name, method=f"check: {mname} vs ours, output", rel_diff=diff,
                                 **peer_info))
                print(f"{name:36s} {mname} vs ours: rel diff {diff:.2e}", flush=True)
                methods[mname] = (runner, kept)
        base = {}
        for mname, (fn, frac) in methods.items():
            row = dict(shape=name, B=B, H=H, S=S, D=D, grid=list(grid), tile_order=order, n_tiles=n, topk=K,
                       method=mname,
                       kept_fraction=frac)
            try:  # the Gluon rows' kernel options (vsa_options) hold for their forward and backward
                with kernel_options(**getattr(fn, "vsa_options", {})):
                    with torch.no_grad():
                        fwd = bench(lambda: fn(q, k, v))
                    row["fwd_ms"] = fwd
                    for attempt in getattr(fn, "options_to_try", [None]):
                        if attempt is not None:
                            fn.kernel_options = row["kernel_options"] = attempt
                        try:
                            fb = bench(lambda: fn(q, k, v), grad_inputs=getattr(fn, "grad_inputs", None) or [q, k, v])
                            break
                        except Exception as e:
                            if attempt is getattr(fn, "options_to_try", [None])[-1]:
                                raise
                            print(name, mname, "retrying:", type(e).__name__, flush=True)
            except Exception as e:  # a baseline that does not run on this stack is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(name, mname, "ERROR", row["error"], flush=True)
                continue
            if mname.startswith("SDPA cuDNN"):
                base = dict(fwd=fwd, fb=fb)
            row.update(fwd_ms=fwd, fwd_bwd_ms=fb,
                       fwd_tflops=dense_fwd * frac / fwd / 1e9, fwd_bwd_tflops=3.5 * dense_fwd * frac / fb / 1e9,
                       speedup_fwd=base.get("fwd", float("nan")) / fwd,
                       speedup_fwd_bwd=base.get("fb", float("nan")) / fb)
            rows.append(row)
            print(f"{name:36s} {mname:46s} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
                  f"x{row['speedup_fwd']:.2f} / x{row['speedup_fwd_bwd']:.2f}", flush=True)
        # Coarse stage alone (pool + scores + top-k) and the transposed lists of the backward. In a
        # CUDA graph: alone, a dozen small launches are bound by Python, not by the GPU.
        with torch.no_grad():
            coarse = triton.testing.do_bench_cudagraph(lambda: coarse_stage(q, k, v, layout, K, True),
                                                       rep=100, return_mode="median")
            _, sel = coarse_stage(q, k, v, layout, K, True)
            cnt = torch.full(sel.shape[:3], K, dtype=torch.int32, device=dev)
            transpose = bench(lambda: transpose_block_lists(sel, cnt, n))
        vsa_fwd = next(r["fwd_ms"] for r in rows if r["shape"] == name and r["method"].startswith("ours: VSA"))
        rows.append(dict(shape=name, method="coarse stage (pool + scores + top-k)", fwd_ms=coarse,
                         share_of_vsa_fwd=coarse / vsa_fwd, transpose_lists_ms=transpose))
        print(f"{name:36s} coarse stage {coarse:.3f} ms = {100 * coarse / vsa_fwd:.1f}% of VSA fwd; "
              f"transposed lists {transpose:.3f} ms", flush=True)
        q = k = v = None  # free this shape's inputs before the next one
        torch.cuda.empty_cache()

    meta = run_meta(sparsity=args.sparsity, dtype="bfloat16", **peer_info)
    write_results(args.out, meta, rows)
    print("\n" + markdown_table(rows, meta))


def markdown_table(rows, meta) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, bf16, "
             f"sparsity {meta['sparsity']}",
             "", "| shape | method | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | speedup vs cuDNN fwd / fwd+bwd |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "fwd_bwd_ms" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f} | "
                         f"{r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x |")
        elif "rel_err_out" in r:
            lines.append(f"| {r['shape']} | {r['method']} | rel err o {r['rel_err_out']:.1e} | dq "
                         f"{r['rel_err_dq']:.1e}, dk {r['rel_err_dk']:.1e}, dv {r['rel_err_dv']:.1e} | | |")
        elif "rel_diff" in r:
            lines.append(f"| {r['shape']} | {r['method']} | rel diff {r['rel_diff']:.1e} | | | |")
        elif "share_of_vsa_fwd" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['fwd_ms']:.3f} | - | "
                         f"{100 * r['share_of_vsa_fwd']:.1f}% of VSA fwd | transposed lists "
                         f"{r['transpose_lists_ms']:.3f} ms |")
        else:
            fwd = f"{r['fwd_ms']:.2f}" if "fwd_ms" in r else "-"
            lines.append(f"| {r['shape']} | {r['method']} | {fwd} | error: {r['error'][:60]} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
