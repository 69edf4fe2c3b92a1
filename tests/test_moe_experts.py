"""moe.experts: the stacked SwiGLU experts' function against composed ops and the per-expert loop in fp64."""

import torch


def test_swiglu_experts_function_matches_composed_ops_and_loop_in_fp64():
    """kernels.reference.swiglu_experts (one autograd Function, gradients written over saved activations) against
    the same ops differentiated by autograd and against the per-expert loop; also with retain_graph."""
    from moekit.kernels.reference import swiglu_experts, swiglu_experts_composed
    from moekit.moe import swiglu_experts_loop

    T, H, Fe, E, k = 23, 8, 6, 4, 2
    args = [torch.randn(T, H), torch.rand(T, k), torch.randn(E, 2 * Fe, H), torch.randn(E, H, Fe)]
    x, w, gu, dn = [a.double().requires_grad_() for a in args]
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[:5] = torch.tensor([0, 1])  # and expert 3 gets nothing
    ids[ids == 3] = 2
    g = torch.randn(T, H, dtype=torch.float64)
    results = []
    for f in (swiglu_experts, swiglu_experts_composed, swiglu_experts_loop):
        y = f(x, w, ids, gu, dn)
        results.append([y, *torch.autograd.grad(y, (x, w, gu, dn), g)])
    for fast, composed, loop in zip(*results):
        assert (fast - loop).abs().max() <= 1e-12 and (composed - loop).abs().max() <= 1e-12
    y = swiglu_experts(x, w, ids, gu, dn)
    first = torch.autograd.grad(y, (x, w, gu, dn), g, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, gu, dn), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.autograd.gradcheck(lambda *t: swiglu_experts(t[0], t[1], ids, t[2], t[3]), (x, w, gu, dn))


