"""The Triton kernels compiled ahead of time for Hopper (sm_90) and Ampere (sm_80), no GPU needed: Triton lowers
each kernel to PTX and ptxas assembles it, with the argument specialisation a real launch gets (16-byte aligned
pointers and sizes, unit strides as constants; triton's own specialize function) and the CUDA tile configs.

Checks that every kernel and mode compiles for the GPU (the interpreter tests run the same source, but not
through this compiler), that the GEMM main loops run on tensor cores (wgmma on sm_90, mma.sync on sm_80) and are
software-pipelined (async copies to shared memory), that shared memory fits, and that ptxas spills no more than a
few registers for the configs the autotune pruning keeps. Says nothing about speed.
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")

H, F, E, T, K = 64, 48, 8, 40, 2  # sizes divisible by 16, like Mixtral's (4096, 14336)
SMEM = {90: 227 * 1024, 80: 163 * 1024}


class Recorder:
    """Stands in for a @triton.jit kernel and records each launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@pytest.fixture(scope="module")
def launches():
    """{(kernel name, variant): (jit function, args, kwargs)} for every launch of a forward+backward step."""
    from moekit.kernels import reference as ref
    from moekit.kernels import triton_decode, triton_gemm, triton_routing

    mp = pytest.MonkeyPatch()
    names = {triton_routing: ["_hist_kernel", "_sort_kernel", "_gather_rows_kernel", "_combine_kernel",
                              "_combine_bwd_kernel"],
             triton_gemm: ["_grouped_mm_kernel", "_grouped_wgrad_kernel"],
             triton_decode: ["_gate_up_kernel", "_down_kernel"]}
    real, recorders = {}, {}
    for module, kernels in names.items():
        for name in kernels:
            real[name], recorders[name] = getattr(module, name), Recorder()
            mp.setattr(module, name, recorders[name])
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x, dy = torch.randn(T, H, dtype=bf), torch.randn(T, H, dtype=bf)
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(K, dim=-1)
    gate_up, down = torch.randn(E, 2 * F, H, dtype=bf), torch.randn(E, H, F, dtype=bf)
    order, _, offsets = ref.routing_metadata(ids, E)
    tok, inv, M = (order // K).int(), torch.argsort(order).int(), T * K
    h, dh, w_sorted = torch.randn(M, F, dtype=bf), torch.randn(M, F, dtype=bf), torch.rand(M)
    try:
        triton_routing.route(ids, E)
        triton_routing.gather_rows(x, order // K)
        triton_routing.combine(torch.randn(M, H, dtype=bf), inv, weights, K)
        triton_routing.combine_backward(dy, torch.randn(M, H, dtype=bf), order, weights)
        triton_gemm.grouped_mm(x, gate_up, offsets, rows=tok, swiglu=True)  # gate_up + SwiGLU, gather
        triton_gemm.grouped_mm(h, down, offsets)  # down
        triton_gemm.grouped_mm(dy, down.transpose(1, 2), offsets, rows=tok)  # dh: gather, B transposed
        triton_gemm.swiglu_backward(x, tok, gate_up, offsets, dh, w_sorted)  # recompute + SwiGLU backward
        triton_gemm.grouped_mm(torch.randn(M, 2 * F, dtype=bf), gate_up.transpose(1, 2), offsets)  # dx
        triton_gemm.grouped_wgrad(dy, h, offsets, rows_a=tok)  # d down
        triton_gemm.grouped_wgrad(torch.randn(M, 2 * F, dtype=bf), x, offsets, rows_b=tok)  # d gate_up
        triton_gemm.grouped_mm(x.float(), gate_up.float(), offsets, rows=tok)  # fp32 (ieee)
        triton_decode.swiglu_experts(x[:4], weights[:4], ids[:4], gate_up, down)
    finally:
        mp.undo()
    variants = ["gate_up", "down", "dh", "swiglu_bwd", "dx", "fp32"]
    out = {}
    for name, rec in recorders.items():
        tags = variants if name == "_grouped_mm_kernel" else ["d_down", "d_gate_up"] if "wgrad" in name else [""]
        assert len(rec.calls) == len(tags), name
        for tag, (args, kwargs) in zip(tags, rec.calls):
            out[name, tag] = real[name], args, kwargs
    return out


def compile_for(fn, args, kwargs, arch: int, num_warps: int = 4, num_stages: int = 3):
    """triton.compile of fn for sm_<arch>, specialised as JITFunction.run would specialise these arguments."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    bound = dict(zip(fn.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        kind, spec = ("constexpr", value) if param.is_constexpr else \
            native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


GEMMS = [  # (kernel, variant, arch, (BLOCK_M|I, BLOCK_N|J, BLOCK_K, warps, stages)): configs the pruning keeps
    ("_grouped_mm_kernel", "gate_up", 90, (128, 128, 64, 8, 4)), ("_grouped_mm_kernel", "down", 90, (128, 256, 64, 8, 3)),
    ("_grouped_mm_kernel", "dh", 90, (128, 256, 64, 8, 3)), ("_grouped_mm_kernel", "swiglu_bwd", 90, (64, 128, 64, 8, 4)),
    ("_grouped_mm_kernel", "dx", 90, (256, 128, 64, 8, 3)), ("_grouped_wgrad_kernel", "d_down", 90, (128, 128, 64, 4, 4)),
    ("_grouped_wgrad_kernel", "d_gate_up", 90, (128, 256, 64, 8, 3)),
    ("_grouped_mm_kernel", "gate_up", 80, (64, 128, 32, 4, 4)), ("_grouped_mm_kernel", "swiglu_bwd", 80, (128, 64, 32, 8, 3)),
    ("_grouped_mm_kernel", "down", 80, (128, 256, 32, 8, 3)), ("_grouped_wgrad_kernel", "d_gate_up", 80, (128, 128, 32, 4, 4)),
]


def ptxas_spills(ptx: str, arch: int) -> int:
    """Bytes of register spill stores ptxas reports for this PTX (same ptxas and flags as triton's compile)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


@pytest.mark.parametrize("name,variant,arch,config", GEMMS, ids=[f"{v}-sm{a}" for _, v, a, _ in GEMMS])
def test_gemm_compiles_to_pipelined_tensor_core_code(launches, name, variant, arch, config):
    fn, args, kwargs = launches[name, variant]
    bm, bn, bk, warps, stages = config
    blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8} if "BLOCK_M" in kwargs else {"BLOCK_I": bm, "BLOCK_J": bn}
    kernel = compile_for(fn, args, {**kwargs, **blocks, "BLOCK_K": bk}, arch, warps, stages)
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    assert ("wgmma.mma_async" if arch == 90 else "mma.sync.aligned") in ptx
    assert "ttg.async_copy_global_to_local" in ttgir  # loads of the next k-tiles overlap the tensor-core work
    assert kernel.metadata.shared <= SMEM[arch]
    assert ptxas_spills(ptx, arch) <= 64  # a few epilogue registers at most; a tile too big for its warps spills KiBs


def test_fp32_gemm_compiles(launches):
    fn, args, kwargs = launches["_grouped_mm_kernel", "fp32"]
    kernel = compile_for(fn, args, {**kwargs, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 90)
    assert kernel.metadata.shared <= SMEM[90]


SMALL = {"_hist_kernel": {"BLOCK": 1024}, "_sort_kernel": {"BLOCK": 1024}, "_gather_rows_kernel": {"BLOCK_H": 1024},
         "_combine_kernel": {"BLOCK_H": 1024}, "_combine_bwd_kernel": {"BLOCK_H": 1024},
         "_gate_up_kernel": {"BLOCK_N": 64, "BLOCK_K": 128}, "_down_kernel": {"BLOCK_N": 64, "BLOCK_K": 128}}


@pytest.mark.parametrize("name", list(SMALL))
def test_routing_and_decode_kernels_compile(launches, name):
    fn, args, kwargs = launches[name, ""]
    kernel = compile_for(fn, args, {**kwargs, **SMALL[name]}, 90)
    assert kernel.asm["cubin"]
