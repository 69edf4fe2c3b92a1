"""One entry point per op: Triton kernels on CUDA tensors (when triton is installed), the pure-torch reference
otherwise. `backend=` forces a choice: "torch", "triton" (on CPU tensors only under TRITON_INTERPRET=1, which
Triton reads when moekit.kernels.triton_ops is first imported) or, for swiglu_experts, "megablocks" (optional package).
"""

import importlib.util
from typing import Literal, get_args

import torch

from . import reference

Backend = Literal["auto", "torch", "triton", "megablocks"]
BACKENDS = get_args(Backend)
HAS_TRITON = importlib.util.find_spec("triton") is not None
DECODE_MAX_COPIES = 32  # T*k at or below which inference takes the per-copy matrix-vector path (see bench --decode)


def _triton_ops():
    from . import triton_ops  # on first use: a CPU-only `import moekit.kernels` never loads triton

    return triton_ops


def resolve_backend(backend: Backend | None, x: torch.Tensor) -> str:
    """The backend that runs an op on x: "auto" (or None) is "triton" on CUDA with triton installed, else "torch"."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ImportError("backend='triton' needs the triton package (pip install 'moekit[triton]')")
        if not x.is_cuda and not _triton_ops().INTERPRET:
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
                             "moekit.kernels.triton_ops is imported")
    return backend


def _impl(op: str, backend: str | None, x: torch.Tensor):
    """The implementation of `op` (a name in reference and triton_ops) that `backend` picks for x."""
    b = resolve_backend(backend, x)
    if b == "megablocks":
        raise ValueError(f"backend='megablocks' covers swiglu_experts only, not {op}")
    return getattr(reference if b == "torch" else _triton_ops(), op)


def routing_metadata(expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None):
    """expert_ids [T, k] -> order [M], counts [E], offsets [E] int32 (see reference.routing_metadata)."""
    return _impl("routing_metadata", backend, expert_ids)(expert_ids, num_experts)


def permute(x: torch.Tensor, order: torch.Tensor, top_k: int, *, backend: str | None = None) -> torch.Tensor:
    """x [T, H] -> x_sorted [M, H] (see reference.permute)."""
    return _impl("permute", backend, x)(x, order, top_k)


def grouped_mm(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *,
               backend: str | None = None) -> torch.Tensor:
    """x_sorted [M, in], weight [E, out, in], offsets [E] -> [M, out] (see reference.grouped_mm)."""
    return _impl("grouped_mm", backend, x_sorted)(x_sorted, weight, offsets)


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """y_sorted [M, H], order [M], weights [T, k] -> y [T, H] (see reference.unpermute)."""
    return _impl("unpermute", backend, y_sorted)(y_sorted, order, weights)


def _check(x, weights, expert_ids, gate_up_proj, down_proj) -> None:
    E, F2, H = gate_up_proj.shape
    if x.ndim != 2 or x.shape[1] != H or F2 % 2 or tuple(down_proj.shape) != (E, H, F2 // 2):
        raise ValueError(f"swiglu_experts: expected x [T, H], gate_up_proj [E, 2F, H], down_proj [E, H, F]; got "
                         f"{tuple(x.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}")
    if weights.shape != expert_ids.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(f"swiglu_experts: weights and expert_ids must both be [T, k] with T={x.shape[0]}; got "
                         f"{tuple(weights.shape)} and {tuple(expert_ids.shape)}")
    if not x.dtype == gate_up_proj.dtype == down_proj.dtype:
        raise ValueError(f"swiglu_experts: x, gate_up_proj and down_proj must share a dtype; got {x.dtype}, "
                         f"{gate_up_proj.dtype}, {down_proj.dtype}")


def swiglu_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The routed SwiGLU experts: x [T, H], weights/expert_ids [T, k], gate_up_proj [E, 2F, H] (gate rows, then up),
    down_proj [E, H, F] -> y [T, H] (see reference.swiglu_experts). On Triton, inference with at most
    DECODE_MAX_COPIES token copies takes the per-copy matrix-vector path."""
    b = resolve_backend(backend, x)
    _check(x, weights, expert_ids, gate_up_proj, down_proj)
    if b == "torch":
        return reference.swiglu_experts(x, weights, expert_ids, gate_up_proj, down_proj)
    if b == "megablocks":
        from .megablocks import swiglu_experts as megablocks_experts

        return megablocks_experts(x, weights, expert_ids, gate_up_proj, down_proj)
    ops = _triton_ops()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up_proj, down_proj))
    if not grad and expert_ids.numel() <= DECODE_MAX_COPIES:
        return ops.swiglu_experts_decode(x, weights, expert_ids, gate_up_proj, down_proj)
    return ops.swiglu_experts(x, weights, expert_ids, gate_up_proj, down_proj)
