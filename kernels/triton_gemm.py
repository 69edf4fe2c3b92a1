"""Grouped GEMM in Triton: one launch for all experts, rows grouped by expert through device-side offsets.

    grouped_mm(a, w, offsets)               c[p] = a[p] @ w[e(p)]^T                      w [E, N, K]
    grouped_mm(a, w, offsets, rows=tok)     c[p] = a[tok[p]] @ w[e(p)]^T   (gather fused into the A load)
    grouped_mm(..., swiglu=True)            c[p] = silu(a_p @ wg^T) * (a_p @ wu^T)     w [E, 2N, K], gate rows first
    swiglu_backward(...)                    recompute gate/up and apply the SwiGLU backward in the epilogue
    grouped_wgrad(a, b, offsets)            c[e] = a_e^T @ b_e over expert e's rows                  -> [E, I, J]

Tile -> expert: program m-tiles are laid out expert after expert (cdiv(count_e, BLOCK_M) each); a program reads
the E offsets, finds its expert with a cumulative sum, and exits early past the last tile. The grid is sized from
the static bound cdiv(M, BLOCK_M) + E, so nothing is read back to the host. Accumulation is fp32.
"""

import functools

import torch
import triton
import triton.language as tl

from .triton_routing import CPU_BLOCK

INTERPRET = bool(triton.knobs.runtime.interpret)
MODE_PLAIN, MODE_SWIGLU, MODE_SWIGLU_BWD = 0, 1, 2


@triton.jit
def _expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Virtual m-tile -> (expert, first row of the tile, end row of the expert); expert >= E past the last tile."""
    e = tl.arange(0, E_PAD)
    ends = tl.load(offsets_ptr + e, mask=e < E, other=0)  # [E_PAD]
    starts = tl.load(offsets_ptr + e - 1, mask=(e > 0) & (e < E), other=0)  # [E_PAD]
    tiles = tl.where(e < E, tl.cdiv(ends - starts, BLOCK_M), 0)  # [E_PAD]
    tile_end = tl.cumsum(tiles, 0)  # [E_PAD]
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    sel = e == expert
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), 0)
    row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return expert, row0, tl.sum(tl.where(sel, ends, 0), 0)


@triton.jit
def _grouped_mm_kernel(a_ptr, rows_ptr, b_ptr, c_ptr, offsets_ptr, d_ptr, w_ptr, h_ptr, dw_ptr,
                       M, N, K, E, M_BUCKET,
                       stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_dm,
                       stride_dn, stride_hm, stride_hn,
                       MODE: tl.constexpr, GATHER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, E_PAD: tl.constexpr):
    """MODE 0: c = a b^T. MODE 1: c = silu(a bg^T) * (a bu^T), bu = rows N.. of b. MODE 2 (SwiGLU backward, given
    d = dh unweighted [M, N] and w = combine weight per sorted row [M]): c = [dgate | dup] [M, 2N],
    h = w * silu(g) * u [M, N], dw[pid_n, p] = sum over this tile's columns of d * silu(g) * u."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M) + E
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    expert, row0, row_end = _expert_tile(pid_m, offsets_ptr, E, BLOCK_M, E_PAD)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM] sorted rows
    rmask = rows < row_end
    if GATHER:
        src = tl.load(rows_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk  # [BK, BN]
    up_off = N * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if MODE != 0:
            bu = tl.load(b_ptrs + up_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = rmask[:, None] & cmask[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    if MODE == 0:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        sig = tl.sigmoid(acc)
        act = acc * sig  # silu(gate)
        if MODE == 1:
            tl.store(c_ptrs, (act * acc_up).to(c_ptr.dtype.element_ty), mask=mask)
        else:
            d = tl.load(d_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn, mask=mask, other=0.0)
            d = d.to(tl.float32)
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]  # [BM, 1]
            h = act * acc_up
            tl.store(dw_ptr + pid_n * M + rows, tl.sum(d * h, 1), mask=rmask)
            tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn, (w * h).to(h_ptr.dtype.element_ty),
                     mask=mask)
            dgate = w * d * acc_up * sig * (1.0 + acc * (1.0 - sig))
            tl.store(c_ptrs, dgate.to(c_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptrs + N * stride_cn, (w * d * act).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(a_ptr, ra_ptr, b_ptr, rb_ptr, c_ptr, offsets_ptr, I, J, E,
                          stride_am, stride_ai, stride_bm, stride_bj, stride_ce, stride_ci, stride_cj,
                          GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[e, i, j] = sum over sorted rows p of expert e of a[ra(p), i] * b[rb(p), j]; zero for an empty expert."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(I, BLOCK_I)
    n_j = tl.cdiv(J, BLOCK_J)
    e = pid // (n_i * n_j)
    pid_i = (pid % (n_i * n_j)) // n_j
    pid_j = pid % n_j
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)  # [BK]
        pmask = p < end
        if GATHER_A:
            pa = tl.load(ra_ptr + p, mask=pmask, other=0).to(tl.int64)
        else:
            pa = p.to(tl.int64)
        if GATHER_B:
            pb = tl.load(rb_ptr + p, mask=pmask, other=0).to(tl.int64)
        else:
            pb = p.to(tl.int64)
        a = tl.load(a_ptr + pa[None, :] * stride_am + ii[:, None] * stride_ai, mask=pmask[None, :] & (ii[:, None] < I),
                    other=0.0)  # [BI, BK]
        b = tl.load(b_ptr + pb[:, None] * stride_bm + jj[None, :] * stride_bj, mask=pmask[:, None] & (jj[None, :] < J),
                    other=0.0)  # [BK, BJ]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + ii[:, None] * stride_ci + jj[None, :] * stride_cj
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(ii[:, None] < I) & (jj[None, :] < J))


# ---- configs: autotuned on CUDA (Hopper / Ampere lists), fixed small blocks on CPU (interpreter) -------------

def _cfg(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config({names[0]: bm, names[1]: bn, names[2]: bk, **({"GROUP_M": 8} if names[0] == "BLOCK_M" else {})},
                         num_warps=warps, num_stages=stages)


HOPPER = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
          (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 8, 4), (128, 64, 64, 4, 4),
          (128, 64, 64, 8, 4), (64, 64, 64, 4, 4)]
AMPERE = [(128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3),
          (64, 128, 32, 4, 4), (64, 128, 32, 8, 4), (128, 64, 32, 4, 4), (128, 64, 32, 8, 3), (64, 64, 32, 4, 5)]
# fp32 accumulator registers per thread above which ptxas spills (checked with ptxas -v on sm_80/sm_90): the
# SwiGLU backward epilogue keeps more values live than the forward
ACC_REGS = {MODE_PLAIN: 128, MODE_SWIGLU: 128, MODE_SWIGLU_BWD: 64}


@functools.cache
def _device_limits(index: int) -> tuple[int, int]:
    """(compute capability major, shared memory per block in bytes) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return props.major, getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def _prune(configs, named_args, **kwargs):
    """Drop configs that overflow shared memory or registers, or whose m-tiles dwarf the token count."""
    smem = _device_limits(torch.cuda.current_device())[1]
    mode = kwargs.get("MODE", MODE_PLAIN)
    n_b = 1 if mode == MODE_PLAIN else 2  # SwiGLU modes load gate and up tiles of B, into two accumulators
    m = named_args.get("M_BUCKET", 1 << 30)
    elem = named_args["a_ptr"].element_size()
    out = []
    for c in configs:
        bm, bn, bk = (c.kwargs.get(a, c.kwargs.get(b)) for a, b in (("BLOCK_M", "BLOCK_I"), ("BLOCK_N", "BLOCK_J"),
                                                                    ("BLOCK_K", "BLOCK_K")))
        fits = (bm * bk + n_b * bk * bn) * elem * c.num_stages <= smem
        regs = n_b * bm * bn // (32 * c.num_warps)
        if fits and regs <= ACC_REGS[mode] and bm <= max(64, m):
            out.append(c)
    return out or configs[-1:]


@functools.cache
def _tuned(name: str, hopper: bool):
    shapes = HOPPER if hopper else AMPERE
    if name == "mm":
        # dw_ptr holds per-n-tile partial sums (MODE 2): configs with another BLOCK_N write other rows, so reset it
        return triton.autotune([_cfg(*s) for s in shapes], key=["N", "K", "M_BUCKET", "MODE", "GATHER"],
                               prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["dw_ptr"])(
            _grouped_mm_kernel)
    names = ("BLOCK_I", "BLOCK_J", "BLOCK_K")
    return triton.autotune([_cfg(*s, names=names) for s in shapes], key=["I", "J", "GATHER_A", "GATHER_B"],
                           prune_configs_by={"early_config_prune": _prune})(_grouped_wgrad_kernel)


def _precision(t: torch.Tensor) -> str:
    """fp32 products in full precision unless torch allows TF32 (as torch.matmul); no effect on 16-bit inputs."""
    return "ieee" if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _launch(name: str, kernel, t: torch.Tensor, grid, args, consts: dict, cpu_blocks: dict):
    """Autotuned launch on CUDA; fixed CPU_BLOCK tiles on CPU tensors (only runnable under TRITON_INTERPRET=1)."""
    if t.is_cuda and not INTERPRET:
        _tuned(name, _device_limits(t.device.index or 0)[0] >= 9)[grid](*args, **consts)
    else:
        kernel[grid](*args, **consts, **cpu_blocks)


_CPU_MM = {"BLOCK_M": CPU_BLOCK, "BLOCK_N": CPU_BLOCK, "BLOCK_K": CPU_BLOCK, "GROUP_M": 2}
_CPU_WG = {"BLOCK_I": CPU_BLOCK, "BLOCK_J": CPU_BLOCK, "BLOCK_K": CPU_BLOCK}


def _mm(a, w, offsets, rows, mode, c, n, d=None, wrow=None, h=None, dw=None):
    M, E, K = c.shape[0], w.shape[0], w.shape[2]
    if M == 0 or n == 0:
        return
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(n, meta["BLOCK_N"]),)
    d_, h_ = (d, h) if d is not None else (c, c)
    args = (a, rows if rows is not None else offsets, w, c, offsets, d_, wrow if wrow is not None else c, h_,
            dw if dw is not None else c, M, n, K, E, triton.next_power_of_2(M), a.stride(0), a.stride(1), w.stride(0),
            w.stride(1), w.stride(2), c.stride(0), c.stride(1), d_.stride(0), d_.stride(1), h_.stride(0), h_.stride(1))
    consts = dict(MODE=mode, GATHER=rows is not None, PRECISION=_precision(a), E_PAD=triton.next_power_of_2(E))
    _launch("mm", _grouped_mm_kernel, a, grid, args, consts, _CPU_MM)


def grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None = None,
               swiglu: bool = False) -> torch.Tensor:
    """a [*, K] (row tok[p] for sorted row p when rows=tok is given, else row p), w [E, N, K] (any strides: pass
    weight.transpose(1, 2) for a product with w[e] itself), offsets [E] int32 -> [M, N] in a's dtype, with M =
    rows.numel() or a.shape[0]. swiglu=True: w is [E, 2N, K] (gate rows, then up rows) and the result [M, N] is
    silu(gate) * up."""
    M = rows.numel() if rows is not None else a.shape[0]
    n = w.shape[1] // 2 if swiglu else w.shape[1]
    c = a.new_empty(M, n)
    _mm(a, w, offsets, rows, MODE_SWIGLU if swiglu else MODE_PLAIN, c, n)
    return c


def swiglu_backward(x: torch.Tensor, tok: torch.Tensor, gate_up: torch.Tensor, offsets: torch.Tensor,
                    dh: torch.Tensor, w_sorted: torch.Tensor):
    """Recompute gate/up = x[tok] @ gate_up[e]^T and apply SwiGLU's backward in the epilogue.

    x [T, H], tok [M], gate_up [E, 2F, H], dh [M, F] (gradient of the unweighted activation h), w_sorted [M] (combine
    weight of each sorted row) -> (dgate_up [M, 2F] = w*dh through SwiGLU, hw [M, F] = w * h, dw [M] fp32 = <dh, h>)."""
    M, F = dh.shape
    dgu = x.new_empty(M, 2 * F)
    hw = x.new_empty(M, F)
    min_bn = CPU_BLOCK if not x.is_cuda or INTERPRET else min(s[1] for s in HOPPER + AMPERE)
    parts = torch.zeros(triton.cdiv(F, min_bn), M, dtype=torch.float32, device=x.device)  # [max n-tiles, M]
    _mm(x, gate_up, offsets, tok, MODE_SWIGLU_BWD, dgu, F, d=dh, wrow=w_sorted, h=hw, dw=parts)
    return dgu, hw, parts.sum(0)


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, rows_a: torch.Tensor | None = None,
                  rows_b: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a [*, I], b [*, J] (gathered through rows_a / rows_b when given), offsets [E] -> [E, I, J]: for each expert
    the sum over its sorted rows p of a[ra(p)]^T b[rb(p)] (a weight gradient dW[e] = dY_e^T X_e)."""
    E, I, J = offsets.numel(), a.shape[1], b.shape[1]
    c = torch.empty(E, I, J, dtype=out_dtype or a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    grid = lambda meta: (E * triton.cdiv(I, meta["BLOCK_I"]) * triton.cdiv(J, meta["BLOCK_J"]),)
    args = (a, rows_a if rows_a is not None else offsets, b, rows_b if rows_b is not None else offsets, c, offsets,
            I, J, E, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2))
    consts = dict(GATHER_A=rows_a is not None, GATHER_B=rows_b is not None, PRECISION=_precision(a))
    _launch("wgrad", _grouped_wgrad_kernel, a, grid, args, consts, _CPU_WG)
    return c
