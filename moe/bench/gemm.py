"""`moekit bench gemm`: the expert GEMMs of a routed layer, ours against torch's grouped_mm and a dense matmul
with the same FLOPs (the limit), forward and forward+backward; prints a table and writes JSON.

Sections (M = T*k token copies, routed uniformly at random over E experts):
  gemm     one grouped GEMM x_sorted [M, H] @ gate_up [E, 2F, H]^T                      2*M*H*2F flops forward
  experts  the routed SwiGLU experts: permute, gate_up, SwiGLU, down, weighted un-permute        6*M*H*F forward
  decode   (--decode) small T, forward only: the per-copy matrix-vector path against the grouped one
forward+backward counts 3x the forward flops (our backward also recomputes gate/up, which is not counted).
Defaults are Mixtral-8x7B's experts (H=4096, F=14336, E=8, top-2), bf16, 4k/16k/64k tokens. On CPU it runs the
torch rows only (use small shapes); the Triton rows need CUDA. A size whose estimated memory (`gemm_memory`) the
device does not have is refused before anything is allocated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.kernels import dispatch, reference
from moekit.llama.checkpoint import dtype_from_name
from moekit.llama.io import check_output_file, check_parents, write_json_atomic

from .layer import has_megablocks, resolve_device
from .options import GemmBenchOptions
from .timing import check_device_memory, device_name, git_commit, median_time


def _step(fn, inputs, backward: bool):
    """A callable running fn(*inputs), and with backward=True also the gradients of all float inputs."""
    leaves = [t for t in inputs if t.requires_grad]
    grad = []  # the output gradient, allocated once

    def run():
        if not backward:
            with torch.no_grad():
                return fn(*inputs)
        out = fn(*inputs)
        grad[:] = grad or [torch.ones_like(out)]
        return torch.autograd.grad(out, leaves, grad[0])
    return run


def _routing(tokens: int, experts: int, top_k: int, device, dtype):
    logits = torch.randn(tokens, experts, device=device)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return weights.to(dtype), ids


def _gemm_cases(x_sorted, w, w_dense, offsets, on_cuda: bool):
    cases = {"dense matmul": (lambda x, wd: x @ wd.T, (x_sorted, w_dense)),
             "torch.grouped_mm": (lambda x, we: F.grouped_mm(x, we.transpose(-2, -1), offs=offsets), (x_sorted, w))}
    if on_cuda and dispatch.HAS_TRITON:
        cases["moekit"] = (lambda x, we: dispatch.grouped_mm(x, we, offsets, backend="triton"), (x_sorted, w))
    return cases


def _dense_swiglu(x, gate_up, down):
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def _experts_cases(x, weights, ids, gate_up, down, on_cuda: bool):
    x_dense = x.detach().repeat_interleave(ids.shape[1], 0).requires_grad_()  # [M, H]
    g0, d0 = gate_up[0].detach().clone().requires_grad_(), down[0].detach().clone().requires_grad_()
    cases = {"dense swiglu": (_dense_swiglu, (x_dense, g0, d0)),
             "torch reference": (reference.swiglu_experts, (x, weights, ids, gate_up, down))}
    if on_cuda and dispatch.HAS_TRITON:
        cases["moekit"] = (lambda *a: dispatch.swiglu_experts(*a, backend="triton"), (x, weights, ids, gate_up, down))
    try:
        from moekit.kernels import megablocks

        megablocks._import()
        mb = [t.detach().requires_grad_() for t in megablocks.prepare(gate_up, down)]
        cases["megablocks"] = (lambda x_, w_, i_, *ws: megablocks.run(x_, w_, i_, gate_up.shape[0], *ws),
                               (x, weights, ids, *mb))
    except ImportError:
        pass
    return cases


def _measure(section, tokens, cases, flops_fwd, passes, device, iters, warmup):
    rows = []
    for name, (fn, inputs) in cases.items():
        for p in passes:
            row = {"section": section, "tokens": tokens, "pass": p, "impl": name}
            try:
                sec = median_time(_step(fn, inputs, p == "fwd+bwd"), device, iters, warmup)
                flops = flops_fwd * (3 if p == "fwd+bwd" else 1)
                row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
            except torch.cuda.OutOfMemoryError:
                row.update(ms=None, tflops=None, error="out of memory")
                torch.cuda.empty_cache()
            rows.append(row)
    for p in passes:  # ratios against the dense limit and against torch's grouped GEMM, per pass
        group = [r for r in rows if r["pass"] == p and r["tflops"]]
        base = {r["impl"]: r["tflops"] for r in group}
        dense = next((v for k, v in base.items() if k.startswith("dense")), None)
        torch_ = base.get("torch.grouped_mm") or base.get("torch reference")
        for r in group:
            r["x_dense"] = r["tflops"] / dense if dense else None
            r["x_torch"] = r["tflops"] / torch_ if torch_ else None
    return rows


def _decode_rows(args, device, dtype):
    from moekit.kernels import triton_ops

    E, H, Fw, k = args.experts, args.hidden, args.ffn, args.top_k
    gate_up = torch.randn(E, 2 * Fw, H, device=device, dtype=dtype) / H ** 0.5
    down = torch.randn(E, H, Fw, device=device, dtype=dtype) / Fw ** 0.5
    rows = []
    for T in args.decode_tokens:
        x = torch.randn(T, H, device=device, dtype=dtype)
        weights, ids = _routing(T, E, k, device, dtype)
        for name, fn in (("moekit decode", triton_ops.swiglu_experts_decode), ("moekit grouped", triton_ops.swiglu_experts),
                         ("torch reference", reference.swiglu_experts)):
            sec = median_time(_step(fn, (x, weights, ids, gate_up, down), False), device, args.iters, args.warmup)
            rows.append({"section": "decode", "tokens": T, "pass": "fwd", "impl": name, "ms": sec * 1e3,
                         "tflops": 6 * T * k * H * Fw / sec / 1e12})
    return rows


def _table(rows) -> str:
    head = f"{'section':<8} {'tokens':>7} {'pass':<8} {'impl':<18} {'ms':>9} {'TFLOP/s':>8} {'x dense':>8} {'x torch':>8}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        lines.append(f"{r['section']:<8} {r['tokens']:>7} {r['pass']:<8} {r['impl']:<18} {fmt(r.get('ms'), '9.3f')} "
                     f"{fmt(r.get('tflops'), '8.2f')} {fmt(r.get('x_dense'), '8.2f')} {fmt(r.get('x_torch'), '8.2f')}")
    return "\n".join(lines)


def gemm_memory(T: int, H: int, F: int, E: int, k: int, element_bytes: int, megablocks: bool = False) -> int:
    """Bytes `measure` needs at most, estimated before it allocates anything: the experts' weights and their
    gradients, 2·3·E·H·F (and with `megablocks` its copy, 3·E·H·F); the dense limit's weights and
    gradients, 2·5·H·F; at the largest T, with M = T·k token copies, the inputs and their gradients
    (2·T·H + 4·M·H: x, the permuted and the repeated copies) and one pass's activations and their gradients,
    2·M·(2·H + 3·F) (gate/up, SwiGLU and down outputs)."""
    M = T * k
    weights = (2 + megablocks) * 3 * E * H * F + 10 * H * F
    return element_bytes * (weights + 2 * T * H + 4 * M * H + 2 * M * (2 * H + 3 * F))


def measure(args: GemmBenchOptions) -> dict:
    device = resolve_device(args.device)
    dtype = dtype_from_name(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    on_cuda = device.type == "cuda"
    E, H, Fw, k = args.experts, args.hidden, args.ffn, args.top_k
    T = max(args.tokens)
    check_device_memory(gemm_memory(T, H, Fw, E, k, dtype.itemsize, on_cuda and has_megablocks()), device,
                        f"bench gemm at T={T} H={H} F={Fw} E={E} k={k} {str(dtype).removeprefix('torch.')}",
                        "give smaller --tokens, --hidden, --ffn or --experts")
    torch.manual_seed(args.seed)
    rows = []
    for T in args.tokens:
        M = T * k
        gate_up = (torch.randn(E, 2 * Fw, H, device=device, dtype=dtype) / H ** 0.5).requires_grad_()
        down = (torch.randn(E, H, Fw, device=device, dtype=dtype) / Fw ** 0.5).requires_grad_()
        x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
        weights, ids = _routing(T, E, k, device, dtype)
        weights.requires_grad_()
        if "gemm" in args.sections:
            order, _, offsets = reference.routing_metadata(ids, E)
            x_sorted = reference.permute(x.detach(), order, k).requires_grad_()
            cases = _gemm_cases(x_sorted, gate_up, gate_up[0].detach().clone().requires_grad_(), offsets, on_cuda)
            rows += _measure("gemm", T, cases, 2 * M * H * 2 * Fw, args.passes, device, args.iters, args.warmup)
        if "experts" in args.sections:
            cases = _experts_cases(x, weights, ids, gate_up, down, on_cuda)
            rows += _measure("experts", T, cases, 6 * M * H * Fw, args.passes, device, args.iters, args.warmup)
        del gate_up, down, x
        if on_cuda:
            torch.cuda.empty_cache()
    if args.decode and on_cuda and dispatch.HAS_TRITON:
        rows += _decode_rows(args, device, dtype)
    return {"device": device_name(device), "commit": git_commit(), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
            "shapes": {"hidden": H, "ffn": Fw, "experts": E, "top_k": k}, "rows": rows}


def run(args: GemmBenchOptions) -> dict:
    """`moekit bench gemm`: measure, print the table, write the JSON."""
    if args.json:
        check_output_file(args.json, args.force)
        check_parents(args.json)
    result = measure(args)
    print(f"{result['device']}, {result['dtype']}, commit {result['commit']}, shapes {result['shapes']}")
    print(_table(result["rows"]))
    if args.json:
        write_json_atomic(args.json, result, args.force)
        print(f"wrote {args.json}")
    return result
