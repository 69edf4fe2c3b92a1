"""Small-token (decode) path: one matrix-vector product per token copy, no sort and no grouped tiles.

With a handful of copies, each expert sees about one row: a grouped GEMM would pad every tile to BLOCK_M rows,
while this path streams each selected expert's weights once per copy. Forward only (inference).
"""

import functools

import torch
import triton
import triton.language as tl

from .triton_routing import CPU_BLOCK

INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, h_ptr, H, F, stride_xt, stride_xh, stride_we, stride_wn, stride_wk,
                    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[i, n] = silu(w[e_i, n] . x[t_i]) * (w[e_i, F + n] . x[t_i]) for copy i = t*k + j (fp32 out)."""
    i = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    e = tl.load(ids_ptr + i).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + e * stride_we + n[:, None] * stride_wn + ks[None, :] * stride_wk  # [BN, BK]
    x_ptrs = x_ptr + (i // TOP_K) * stride_xt + ks * stride_xh
    gate = tl.zeros((BLOCK_N,), tl.float32)
    up = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kmask = ks < H - k0
        x = tl.load(x_ptrs, mask=kmask, other=0.0).to(tl.float32)[None, :]  # [1, BK]
        m = (n[:, None] < F) & kmask[None, :]
        gate += tl.sum(tl.load(w_ptrs, mask=m, other=0.0).to(tl.float32) * x, 1)
        up += tl.sum(tl.load(w_ptrs + F * stride_wn, mask=m, other=0.0).to(tl.float32) * x, 1)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xh
    tl.store(h_ptr + i * F + n, gate * tl.sigmoid(gate) * up, mask=n < F)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, wts_ptr, w_ptr, y_ptr, H, F, stride_we, stride_wn, stride_wk, stride_yt, stride_yh,
                 TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[t, n] = sum_j wts[t, j] * (w[e_tj, n] . h[t*k + j]): down projection and weighted combine in one pass."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for j in tl.static_range(TOP_K):
        i = t * TOP_K + j
        e = tl.load(ids_ptr + i).to(tl.int64)
        part = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, F, BLOCK_K):
            kk = k0 + ks
            h = tl.load(h_ptr + i * F + kk, mask=kk < F, other=0.0)[None, :]  # [1, BK] fp32
            w = tl.load(w_ptr + e * stride_we + n[:, None] * stride_wn + kk[None, :] * stride_wk,
                        mask=(n[:, None] < H) & (kk[None, :] < F), other=0.0)  # [BN, BK]
            part += tl.sum(w.to(tl.float32) * h, 1)
        acc += tl.load(wts_ptr + i).to(tl.float32) * part
    tl.store(y_ptr + t * stride_yt + n * stride_yh, acc.to(y_ptr.dtype.element_ty), mask=n < H)


_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in
            [(16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 64, 4), (128, 64, 8)]]


@functools.cache
def _tuned(name: str):
    if name == "gate_up":
        return triton.autotune(_CONFIGS, key=["H", "F", "TOP_K"])(_gate_up_kernel)
    return triton.autotune(_CONFIGS, key=["H", "F", "TOP_K"])(_down_kernel)


def _run(name, kernel, t, rows, n, args, consts):
    if t.is_cuda and not INTERPRET:
        _tuned(name)[lambda meta: (rows, triton.cdiv(n, meta["BLOCK_N"]))](*args, **consts)
    else:
        kernel[(rows, triton.cdiv(n, CPU_BLOCK))](*args, **consts, BLOCK_N=CPU_BLOCK, BLOCK_K=CPU_BLOCK)


def swiglu_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
    """Same contract as reference.swiglu_experts (x [T, H], weights/expert_ids [T, k], gate_up_proj [E, 2F, H],
    down_proj [E, H, F] -> y [T, H]); no autograd."""
    (T, H), k, F = x.shape, expert_ids.shape[1], down_proj.shape[2]
    y = x.new_empty(T, H)
    if T == 0 or H == 0:
        return y
    ids = expert_ids.contiguous()
    h = torch.empty(T * k, F, dtype=torch.float32, device=x.device)  # [M, F] activations, fp32
    if F:
        _run("gate_up", _gate_up_kernel, x, T * k, F,
             (x, ids, gate_up_proj, h, H, F, x.stride(0), x.stride(1), *gate_up_proj.stride()), {"TOP_K": k})
    _run("down", _down_kernel, x, T, H, (h, ids, weights.contiguous(), down_proj, y, H, F, *down_proj.stride(),
                                         y.stride(0), y.stride(1)), {"TOP_K": k})
    return y
