"""The hot ops of a routed layer behind one small API.

    order, counts, offsets = routing_metadata(expert_ids, E)   # expert_ids [T, k]
    x_sorted = permute(x, order, k)                              # [T*k, H], grouped by expert
    h = grouped_mm(x_sorted, w, offsets)                         # w [E, out, in] -> [T*k, out]
    y = unpermute(h, order, weights)                             # weighted sum of the k copies -> [T, H]

`reference` is the pure-torch implementation (CPU path and test oracle). Note: transformers probes for a
package named `kernels` (HF's kernel hub); tests check it does not mistake this one for it.
"""

from .reference import grouped_mm, grouped_mm_loop, permute, routing_metadata, swiglu, swiglu_experts, unpermute

__all__ = ["grouped_mm", "grouped_mm_loop", "permute", "routing_metadata", "swiglu", "swiglu_experts", "unpermute"]
