"""The hot ops of a routed layer behind one small API.

    order, counts, offsets = routing_metadata(expert_ids, E)   # expert_ids [T, k]
    x_sorted = permute(x, order, k)                              # [T*k, H], grouped by expert
    h = grouped_mm(x_sorted, w, offsets)                         # w [E, out, in] -> [T*k, out]
    y = unpermute(h, order, weights)                             # weighted sum of the k copies -> [T, H]

`reference` is the pure-torch implementation (CPU path and test oracle); `dispatch` sends CUDA tensors to the
Triton kernels (`triton_ops`: custom ops with autograd) and takes `backend=` ("torch", "triton", "megablocks").
Note: transformers probes for a package named `kernels` (HF's kernel hub); tests check it does not mistake this
one for it.
"""

from .dispatch import grouped_mm, permute, resolve_backend, routing_metadata, swiglu_experts, unpermute
from .reference import grouped_mm_loop, swiglu

__all__ = ["grouped_mm", "grouped_mm_loop", "permute", "resolve_backend", "routing_metadata", "swiglu", "swiglu_experts",
           "unpermute"]
