"""Triton kernels for the routing bookkeeping: the stable sort of token copies by expert, the gather of token rows
(permute) and the weighted sum of each token's k copies (un-permute), with no host-device sync.

Grids are sized from static shapes only (M = T*k copies, E experts, H hidden), never from routed counts. The
un-permute is a gather through the inverse permutation, so it needs no atomics and is deterministic.
"""

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)  # read once, as @triton.jit does when this module is imported
CPU_BLOCK = 16  # block size on CPU tensors (interpreter); small so tests cross tile edges


@triton.jit
def _hist_kernel(ids_ptr, hist_ptr, M, E, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """hist[b, e] = number of copies in block b of the flat expert ids routed to expert e."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    e = tl.arange(0, E_PAD)
    ids = tl.load(ids_ptr + i, mask=i < M, other=-1).to(tl.int32)  # [BLOCK]
    hit = (ids[:, None] == e[None, :]).to(tl.int32)  # [BLOCK, E_PAD]
    tl.store(hist_ptr + b * E + e, tl.sum(hit, 0), mask=e < E)


@triton.jit
def _sort_kernel(ids_ptr, base_ptr, order_ptr, inv_ptr, tok_ptr, M, E, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                 E_PAD: tl.constexpr):
    """Scatter each copy i to its sorted position pos = base[b, e] + (rank of i among block b's copies of e)."""
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + i, mask=i < M, other=-1).to(tl.int32)  # [BLOCK]
    valid = (i < M) & (ids >= 0) & (ids < E)  # ids outside [0, E) are dropped rather than written out of bounds
    hit = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)  # [BLOCK, E_PAD]
    rank = tl.sum(tl.cumsum(hit, 0) * hit, 1) - 1  # [BLOCK] stable rank within the block
    pos = tl.load(base_ptr + b * E + ids, mask=valid, other=0) + rank
    tl.store(order_ptr + pos, i, mask=valid)
    tl.store(tok_ptr + pos, i // TOP_K, mask=valid)
    tl.store(inv_ptr + i, pos, mask=valid)


def route(expert_ids: torch.Tensor, num_experts: int):
    """expert_ids [T, k] -> order [M] int64 (as reference.routing_metadata), inv [M] int32 (sorted position of
    copy i), tok [M] int32 (token of sorted row p), counts [E] int64, offsets [E] int32 (cumulative ends)."""
    T, k = expert_ids.shape
    M, E, dev = T * k, num_experts, expert_ids.device
    ids = expert_ids.reshape(-1)  # [M]
    e_pad = triton.next_power_of_2(E)
    block = CPU_BLOCK if not ids.is_cuda else max(16, min(1024, 8192 // e_pad))
    nb = triton.cdiv(M, block)
    order = torch.empty(M, dtype=torch.int64, device=dev)
    inv = torch.empty(M, dtype=torch.int32, device=dev)
    tok = torch.empty(M, dtype=torch.int32, device=dev)
    if nb == 0:
        counts = torch.zeros(E, dtype=torch.int64, device=dev)
        return order, inv, tok, counts, counts.to(torch.int32)
    hist = torch.empty(nb, E, dtype=torch.int32, device=dev)  # [nb, E]
    _hist_kernel[(nb,)](ids, hist, M, E, BLOCK=block, E_PAD=e_pad)
    incl = hist.cumsum(0)  # [nb, E] int64, copies of e in blocks <= b
    counts = incl[-1].clone()  # [E] (own storage: custom-op outputs must not be views)
    offsets = counts.cumsum(0)  # [E]
    base = ((offsets - counts)[None, :] + incl - hist).to(torch.int32)  # [nb, E] first sorted slot of (b, e)
    _sort_kernel[(nb,)](ids, base, order, inv, tok, M, E, TOP_K=k, BLOCK=block, E_PAD=e_pad)
    return order, inv, tok, counts, offsets.to(torch.int32)


def inverse(order: torch.Tensor) -> torch.Tensor:
    """order [M] -> inv [M] int32 with inv[order[p]] = p (device-side scatter, no sync)."""
    ar = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return torch.empty_like(ar).scatter_(0, order, ar)


@triton.jit
def _gather_rows_kernel(x_ptr, src_ptr, scale_ptr, out_ptr, H, stride_xm, stride_xh, stride_om, stride_oh,
                        SCALE: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[p] = x[src[p]] (* scale[p])."""
    p = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    src = tl.load(src_ptr + p).to(tl.int64)
    v = tl.load(x_ptr + src * stride_xm + cols * stride_xh, mask=cols < H, other=0.0)
    if SCALE:
        v = v.to(tl.float32) * tl.load(scale_ptr + p).to(tl.float32)
    tl.store(out_ptr + p * stride_om + cols * stride_oh, v.to(out_ptr.dtype.element_ty), mask=cols < H)


def _block_h(t: torch.Tensor, H: int) -> int:
    return min(1024, triton.next_power_of_2(H)) if t.is_cuda else CPU_BLOCK


def gather_rows(x: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], src [M] (row of x for each output row), scale [M] or None -> [M, H] (in x's dtype)."""
    M, H = src.numel(), x.shape[1]
    out = x.new_empty(M, H)
    if M and H:
        bh = _block_h(x, H)
        _gather_rows_kernel[(M, triton.cdiv(H, bh))](
            x, src, scale if scale is not None else src, out, H, x.stride(0), x.stride(1), out.stride(0),
            out.stride(1), SCALE=scale is not None, BLOCK_H=bh)
    return out


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, H, stride_ym, stride_yh, stride_ot, stride_oh,
                    TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[inv[t*k + j]] (fp32 sum in a fixed order: deterministic)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for j in tl.static_range(TOP_K):
        p = tl.load(inv_ptr + t * TOP_K + j).to(tl.int64)
        v = tl.load(y_ptr + p * stride_ym + cols * stride_yh, mask=cols < H, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t * stride_ot + cols * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


def combine(y_sorted: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """y_sorted [M, H], inv [M], weights [T, k] or None (all ones) -> [T, H]: each token's k copies summed."""
    M, H = y_sorted.shape
    T = M // top_k
    out = y_sorted.new_empty(T, H)
    if T and H:
        bh = _block_h(y_sorted, H)
        w = weights.contiguous() if weights is not None else inv
        _combine_kernel[(T, triton.cdiv(H, bh))](
            y_sorted, inv, w, out, H, y_sorted.stride(0), y_sorted.stride(1), out.stride(0), out.stride(1),
            TOP_K=top_k, WEIGHTED=weights is not None, BLOCK_H=bh)
    return out


@triton.jit
def _combine_bwd_kernel(dy_ptr, y_ptr, order_ptr, w_ptr, dys_ptr, dw_ptr, H, stride_dyt, stride_dyh, stride_ym,
                        stride_yh, stride_dsm, stride_dsh, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Sorted row p of copy i = order[p], token t = i // k: dys[p] = w[i] * dy[t]; dw[i] = <dy[t], y[p]>."""
    p = tl.program_id(0).to(tl.int64)
    i = tl.load(order_ptr + p).to(tl.int64)
    t = i // TOP_K
    w = tl.load(w_ptr + i).to(tl.float32)
    dot = tl.zeros((BLOCK_H,), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        dy = tl.load(dy_ptr + t * stride_dyt + cols * stride_dyh, mask=cols < H, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + p * stride_ym + cols * stride_yh, mask=cols < H, other=0.0).to(tl.float32)
        tl.store(dys_ptr + p * stride_dsm + cols * stride_dsh, (w * dy).to(dys_ptr.dtype.element_ty), mask=cols < H)
        dot += dy * y
    tl.store(dw_ptr + i, tl.sum(dot, 0))


def combine_backward(dy: torch.Tensor, y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor):
    """Backward of combine: dy [T, H], y_sorted [M, H], order [M], weights [T, k] -> (dy_sorted [M, H],
    dweights [T, k] in weights' dtype)."""
    M, H = y_sorted.shape
    dys = y_sorted.new_empty(M, H)
    dw = torch.empty(M, dtype=torch.float32, device=dy.device)
    if M:
        bh = _block_h(dy, H)
        _combine_bwd_kernel[(M,)](
            dy, y_sorted, order, weights.contiguous(), dys, dw, H, dy.stride(0), dy.stride(1), y_sorted.stride(0),
            y_sorted.stride(1), dys.stride(0), dys.stride(1), TOP_K=weights.shape[1], BLOCK_H=bh)
    return dys, dw.view(weights.shape).to(weights.dtype)
