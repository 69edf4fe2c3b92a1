"""`moekit bench layer`: one routed layer, side by side with its peers, forward and forward+backward.

Contenders, all on the same input x [1, T, H] and (for the routed ones) the same router and expert weights:
  moekit           our MoEFeedForward (router + kernels.swiglu_experts: Triton on CUDA, pure torch on CPU)
  hf-eager         transformers' MixtralSparseMoeBlock, experts_implementation "eager" (per-expert loop)
  hf-grouped_mm    the same block with experts_implementation "grouped_mm"
  megablocks       our router, then megablocks' dropless grouped GLU experts (ParallelDroplessMLP, through
                   kernels.megablocks) on a copy of our weights in its layout; CUDA only, when installed
  dense-equivalent a dense SwiGLU of width k*F: the expert FLOPs with zero routing overhead (the limit)
Default contenders: all but megablocks on CPU; on CUDA moekit, hf-grouped_mm, megablocks (when the package is
installed; left out, with the reason printed, if it then fails to import) and dense-equivalent. hf-eager, a
per-expert Python loop with host syncs, is left out on CUDA to save time and
memory (each routed contender holds its own copy of the expert weights); name it with --only to time it.

Times are medians over `repeats` round-robin runs after `warmup` (CUDA events, the device synchronised before
each run, on GPU; time.perf_counter on CPU); ratios are to the dense-equivalent. Gradients are dropped after
each forward+backward (outside the timing), so one contender's gradients are live at a time. On CUDA each size
also records whether one moekit forward (inference, then training) runs under
torch.cuda.set_sync_debug_mode("error"): "syncs_in_forward" is 0, or the error's first line. A peer that fails
(out of memory, an error of its own) gets the reason in its row and the others go on. "max_abs_diff_vs_moekit"
is max |y - y_moekit| over the layer's output; in bf16 transformers' router takes its logits in bf16 (ours and
the megablocks contender's in fp32), so a few near-tie tokens may pick other experts and dominate it.

The GPU figures in BENCHMARKS.md (Mixtral-8x7B experts: H=4096, F=14336, E=8, top-2; 4k, 16k, 64k tokens; bf16):
    moekit bench layer --preset mixtral --device cuda --json runs/bench/layer_gpu.json
(to time the eager block as well: --only moekit hf-eager hf-grouped_mm megablocks dense-equivalent, leaving out
megablocks where it is not installed).
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moekit.kernels import megablocks
from moekit.llama.checkpoint import dtype_from_name
from moekit.llama.errors import MoekitError
from moekit.llama.model import MLP
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoEFeedForward

from .options import CONTENDERS, LayerBenchOptions
from .timing import check_device_memory, environment, time_once

PEERS = ("hf-grouped_mm", "megablocks", "hf-eager")  # what moekit's speed-up is reported against
def has_megablocks() -> bool:
    return importlib.util.find_spec("megablocks") is not None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): cuda when torch sees a GPU, else cpu; "cpu", "cuda" or "cuda:N" as given."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise MoekitError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoekitError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU "
                          "(torch.cuda.is_available() is False)")
    return device


def default_contenders(device: torch.device) -> tuple[str, ...]:
    if device.type == "cpu":
        return ("moekit", "hf-eager", "hf-grouped_mm", "dense-equivalent")
    return ("moekit", "hf-grouped_mm", *(("megablocks",) if has_megablocks() else ()), "dense-equivalent")


def check_contenders(contenders: Sequence[str], device: torch.device) -> None:
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        raise MoekitError(f"unknown contender {unknown[0]!r}; expected some of {', '.join(CONTENDERS)}")
    if "megablocks" in contenders:
        if device.type != "cuda":
            raise MoekitError(f"contender 'megablocks' runs on CUDA only (device {device})")
        if not has_megablocks():
            raise MoekitError("contender 'megablocks' needs the megablocks package (pip install 'moekit[megablocks]'), "
                              "which is not installed")


def hf_block(config: MoEConfig, ours: MoEFeedForward, implementation: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
                        num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    cfg._experts_implementation = implementation  # what from_pretrained(..., experts_implementation=...) sets
    block = MixtralSparseMoeBlock(cfg)
    block.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("correction_bias")})
    return block


class MegablocksLayer(nn.Module):
    """A copy of our router, then megablocks' dropless grouped GLU experts on a copy of our expert weights in
    its layout (w1, v1, w2 [E*F, H], laid out once here, not per call): x [B, S, H] -> y [B, S, H]."""

    def __init__(self, ours: MoEFeedForward):
        super().__init__()
        megablocks._import()  # a missing or broken install fails here, not in the first timed run
        self.gate = copy.deepcopy(ours.gate)
        self.num_experts = ours.experts.num_experts
        ws = megablocks.prepare(ours.experts.gate_up_proj.detach(), ours.experts.down_proj.detach())
        self.w1, self.v1, self.w2 = (nn.Parameter(w.contiguous().clone()) for w in ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        r = self.gate(flat)
        return megablocks.run(flat, r.weights, r.expert_ids, self.num_experts, self.w1, self.v1, self.w2).view(x.shape)


def forward_syncs(layer: nn.Module, x: torch.Tensor) -> int | str | None:
    """0 when a forward of `layer` at x's shape, inference and then training (no backward), makes no host-device
    synchronisation after a warm-up call; else the first line of the error set_sync_debug_mode("error") raised.
    None on CPU."""
    if not x.is_cuda:
        return None
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            layer(x)  # warm-up at this shape (Triton autotuning synchronises)
            torch.cuda.synchronize(x.device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                layer(x)
            except Exception as e:  # the benchmark goes on; the report says what synchronised
                return f"{'training' if grad else 'inference'} forward: {_first_line(e)}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return 0


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def layer_memory(H: int, F: int, E: int, k: int, T: int, element_bytes: int, contenders: Sequence[str]) -> int:
    """Bytes bench_layer needs at most, estimated before it allocates anything: every routed contender's own router
    and experts (H·E + 3·E·H·F each; moekit's are built whether timed or not), the dense-equivalent SwiGLU
    (3·H·k·F), one contender's gradients of those (gradients are dropped after each run); and at the largest T the
    input and output gradient (2·T·H) plus one forward+backward's activations and their gradients,
    2·T·k·(2·H + 3·F) (the token copies, their gate/up, SwiGLU and down outputs)."""
    experts = H * E + 3 * E * H * F
    copies = 1 + sum(c not in ("moekit", "dense-equivalent") for c in contenders)
    dense = 3 * H * k * F if "dense-equivalent" in contenders else 0
    activations = 2 * T * H + 2 * T * k * (2 * H + 3 * F)
    return element_bytes * (copies * experts + dense + max(experts, dense) + activations)


def bench_layer(hidden_size: int = 1024, intermediate_size: int = 2816, num_experts: int = 8, top_k: int = 2,
                tokens: int | Sequence[int] = 4096, dtype: torch.dtype | None = None, repeats: int | None = None,
                warmup: int | None = None, contenders: Sequence[str] | None = None, seed: int = 0,
                device: str | torch.device | None = "cpu") -> dict:
    """Time every contender at each token count in `tokens`, the modules built once on `device`.

    Defaults by device: dtype fp32 (CPU) / bf16 (CUDA), repeats 5 / 10, warmup 1 / 2, contenders as
    default_contenders. Returns {"setup": {...}, "runs": [{"tokens", "results": [{name, forward_s,
    forward_backward_s, ...}], "moekit_speedup", "syncs_in_forward", ...}, one per token count]}."""
    device = resolve_device(device)
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    repeats = repeats or (10 if on_cuda else 5)
    warmup = (2 if on_cuda else 1) if warmup is None else warmup
    explicit, contenders = contenders is not None, tuple(contenders or default_contenders(device))
    check_contenders(contenders, device)
    sizes = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    needed = layer_memory(hidden_size, intermediate_size, num_experts, top_k, max(sizes), dtype.itemsize,
                          contenders)
    check_device_memory(needed, device, f"bench layer at H={hidden_size} F={intermediate_size} E={num_experts} "
                        f"k={top_k} T={max(sizes)} {str(dtype).removeprefix('torch.')}",
                        "give smaller --tokens, --hidden, --ffn or --experts")
    torch.manual_seed(seed)
    config = MoEConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=1,
                       num_attention_heads=1, num_local_experts=num_experts, num_experts_per_tok=top_k, vocab_size=8)
    left_out: dict[str, str] = {}
    with torch.device(device):
        ours = MoEFeedForward(config).to(dtype)
        for p in ours.parameters():
            nn.init.normal_(p, std=hidden_size ** -0.5)
        modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"moekit": lambda t: ours(t)[0]}
        for name in contenders:
            if name.startswith("hf-"):
                modules[name] = hf_block(config, ours, name.removeprefix("hf-")).to(dtype)
            elif name == "megablocks":
                try:
                    modules[name] = MegablocksLayer(ours)
                except ImportError as e:  # asked for: an error; chosen by default: left out, and said so
                    if explicit:
                        raise MoekitError(f"contender 'megablocks': {_first_line(e)}") from e
                    left_out[name] = _first_line(e)
            elif name == "dense-equivalent":
                modules[name] = MLP(config, top_k * intermediate_size).to(dtype)
    contenders = tuple(c for c in contenders if c not in left_out)
    params = {name: list((m if isinstance(m, nn.Module) else ours).parameters()) for name, m in modules.items()}
    runs = [_run_size(T, modules, params, ours, contenders, dtype, repeats, warmup, seed, device) for T in sizes]
    setup = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts, top_k=top_k,
                 tokens=list(sizes), dtype=str(dtype).removeprefix("torch."), repeats=repeats, warmup=warmup,
                 contenders=list(contenders), left_out=left_out, **environment(device))
    return {"setup": setup, "runs": runs}


def _run_size(T, modules, params, ours, contenders, dtype, repeats, warmup, seed, device) -> dict:
    """One token count: every contender, round robin; see bench_layer."""
    H = ours.config.hidden_size
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous size's blocks, so a larger size finds the memory unfragmented
    g = torch.Generator(device).manual_seed(seed + T)  # the same inputs whichever contenders run
    x = torch.randn(1, T, H, generator=g, device=device, dtype=dtype)
    grad = torch.randn(x.shape, generator=g, device=device, dtype=dtype)
    errors: dict[str, str] = {}

    def forward(name):
        with torch.no_grad():
            modules[name](x)

    def forward_backward(name):  # as a training step: fresh gradients (zero_grad(set_to_none=True))
        modules[name](x.detach().requires_grad_()).backward(grad)

    def attempt(name, fn):
        try:
            return fn()
        except Exception as e:  # a peer that fails is reported in its row; moekit's failures other than OOM raise
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            if name == "moekit" and not oom:
                raise
            errors[name] = "out of memory" if oom else f"{type(e).__name__}: {_first_line(e)}"
            return None
        finally:
            for p in params[name]:
                p.grad = None
            if name in errors and device.type == "cuda":
                torch.cuda.empty_cache()

    with torch.no_grad():  # the routed contenders compute the same function: record how closely
        y_ref = modules["moekit"](x)
        agree = {name: attempt(name, lambda n=name, y=y_ref: (modules[n](x) - y).abs().max().item())
                 if name not in ("moekit", "dense-equivalent") else None for name in contenders}
        del y_ref
    # Round robin: every repeat times each contender once, so load from other processes hits all of them alike.
    times = {name: {"forward": [], "forward_backward": []} for name in contenders}
    for step in range(warmup + repeats):
        for name in contenders:
            for kind, fn in (("forward", forward), ("forward_backward", forward_backward)):
                if name in errors:
                    continue
                sec = attempt(name, lambda n=name, f=fn: time_once(lambda: f(n), device))
                if step >= warmup and sec is not None:
                    times[name][kind].append(sec)
    median = lambda v: statistics.median(v) if v else None
    results = [{"name": name, "forward_s": median(t["forward"]), "forward_backward_s": median(t["forward_backward"]),
                "max_abs_diff_vs_moekit": agree[name], "forward_runs_s": t["forward"],
                "forward_backward_runs_s": t["forward_backward"], **({"error": errors[name]} if name in errors else {})}
               for name, t in times.items()]
    ratio = lambda a, b: a / b if a is not None and b else None
    by_name = {r["name"]: r for r in results}
    base = by_name.get("dense-equivalent")
    for r in results:
        for kind in ("forward", "forward_backward"):
            r[f"{kind}_x_dense"] = ratio(r[f"{kind}_s"], base[f"{kind}_s"]) if base else None
    ours_r = by_name.get("moekit")
    speedup = {peer: {kind: ratio(by_name[peer][f"{kind}_s"], ours_r[f"{kind}_s"])
                      for kind in ("forward", "forward_backward")}
               for peer in PEERS if peer in by_name and ours_r}
    syncs = None
    if device.type == "cuda" and "moekit" in contenders:
        syncs = attempt("moekit", lambda: forward_syncs(ours, x))
    flops = 2 * 3 * T * ours.config.num_experts_per_tok * ours.config.moe_intermediate_size * H  # expert matmuls
    return {"tokens": T, "forward_gflop": flops / 1e9, "results": results, "moekit_speedup": speedup,
            "syncs_in_forward": syncs}


def format_table(report: dict) -> str:
    """One markdown table per token count; on CUDA also moekit's speed-ups and its forward's host syncs."""
    s = report["setup"]
    where = s["gpu"] if s.get("device") == "cuda" else f"{s['threads']} threads"
    ms = lambda v: "-" if v is None else f"{1e3 * v:.1f}"
    x = lambda v: "-" if v is None else f"{v:.2f}"
    xx = lambda v: "-" if v is None else f"{v:.2f}x"
    blocks = [f"left out: {name} ({why})" for name, why in s.get("left_out", {}).items()]
    for run in report["runs"]:
        head = (f"MoE layer, H={s['hidden_size']} F={s['intermediate_size']} E={s['num_experts']} k={s['top_k']} "
                f"T={run['tokens']} {s['dtype']}, {where}, median of {s['repeats']}")
        rows = [head, "", "| layer | forward (ms) | x dense | forward+backward (ms) | x dense |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for r in run["results"]:
            name = r["name"] + (f" ({r['error']})" if r.get("error") else "")
            rows.append(f"| {name} | {ms(r['forward_s'])} | {x(r['forward_x_dense'])} | "
                        f"{ms(r['forward_backward_s'])} | {x(r['forward_backward_x_dense'])} |")
        if s.get("device") == "cuda":
            rows.append("")
            for peer, sp in run["moekit_speedup"].items():
                rows.append(f"moekit vs {peer}: forward {xx(sp['forward'])}, forward+backward "
                            f"{xx(sp['forward_backward'])} faster")
            if run["syncs_in_forward"] is not None:
                rows.append(f"moekit forward, host-device syncs under set_sync_debug_mode('error'): "
                            f"{run['syncs_in_forward']}")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)


def run(options: LayerBenchOptions) -> dict:
    """`moekit bench layer`: bench_layer with the options given (else the preset's, else the defaults); print the
    table and write the JSON."""
    from moekit.llama.io import check_output_file, check_parents, write_json_atomic

    if options.json:
        check_output_file(options.json, options.force)
        check_parents(options.json)
    kwargs = options.layer_kwargs()
    if "dtype" in kwargs:
        kwargs["dtype"] = dtype_from_name(kwargs["dtype"])
    if options.threads:
        torch.set_num_threads(options.threads)
    report = bench_layer(**kwargs, contenders=options.only, device=options.device)
    print(format_table(report))
    if options.json:
        write_json_atomic(options.json, report, options.force)
        print(f"wrote {options.json}")
    return report
