"""The memory a training run will need, estimated before anything large is allocated: absurd sizes
(--batch-size 10^12, --grad-accum 10^9, --eval-batches 10^9, long windows of large batches) are refused in one
line giving the estimate and what is available, instead of failing in the allocator.

The estimate is simple on purpose, in fp32 as the trainer keeps weights and optimizer state (B --batch-size,
A --grad-accum, S --seq-len, P processes, N --eval-batches; the model: L layers, H hidden, F the FFN width one
token goes through (intermediate_size; for MoE k experts' width plus the shared expert's), k experts per token):

    optimizer    12 bytes a parameter this process holds (its share under --shard-degree / --expert-parallel):
                 gradients and AdamW's two moments
    weights      4 bytes a parameter it holds; on CPU counted only while the model is unloaded (a split run's,
                 on the meta device: a whole model is loaded already)
    windows      8 bytes a token id (int64): one optimizer step's windows [A*B, S+1], the validation windows
                 [N*B, S+1], and the window starts drawn for all processes (A*B*P and N*B*P)
    activations  4 bytes x B x S x (L x (16 H + 4 F + 2 k H) + 4 H) for one micro-batch: per layer and token,
                 16 hidden-sized vectors (norms, attention inputs and outputs, residuals), 4 FFN-sized ones (gate,
                 up, their product and its gradient) and, in routed layers, k copies of the hidden state; the LM
                 head's loss is fused, so no [B*S, V] logits

On CPU all of it counts against the host's available memory; on CUDA the windows count against the host's, and
the weights, optimizer, activations and windows against the device's free memory.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.llama.errors import ConfigError
from moekit.llama.io import check_memory

from .options import TrainOptions
from .parallel import Layout, is_routed_expert

HINT = "lower --batch-size, --grad-accum, --eval-batches or --seq-len"
_CAP = 10**30  # estimates beyond this are absurd anyway (and stay printable as floats)


def run_bytes(options: TrainOptions, model: nn.Module, layout: Layout) -> dict[str, int]:
    """{part: bytes} of the estimate in the module docstring (Python integers: no overflow)."""
    o, cfg = options, model.config
    B, A, S, N, P = o.batch_size, o.grad_accum, o.seq_len, o.eval_batches, layout.world
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    k = getattr(cfg, "num_experts_per_tok", 0) if hasattr(cfg, "num_local_experts") else 0
    F = (k * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size) if k else cfg.intermediate_size
    params = 0  # this process's share: the dense weights split over --shard-degree, the experts as `layout` says
    for name, p in model.named_parameters():
        replicas = layout.expert_replicas() if is_routed_expert(name) else layout.dense_replicas()
        params += -(-p.numel() * replicas // layout.world)
    return {"optimizer": 12 * params,
            "windows": 8 * ((A * B + N * B) * (S + 1) + (A + N) * B * P),
            "activations": 4 * B * S * (L * (16 * H + 4 * F + 2 * k * H) + 4 * H),
            "weights": 4 * params}


def check_budget(options: TrainOptions, model: nn.Module, layout: Layout, device: torch.device) -> None:
    """Refuse, before allocating, a run estimated to need more memory than the machine has (see the module
    docstring)."""
    need = {k: min(v, _CAP) for k, v in run_bytes(options, model, layout).items()}
    what = (f"training with --batch-size {options.batch_size} x --grad-accum {options.grad_accum} x --seq-len "
            f"{options.seq_len} and --eval-batches {options.eval_batches}")
    if device.type != "cuda":
        unloaded = next(model.parameters()).is_meta
        check_memory(need["optimizer"] + need["windows"] + need["activations"] + unloaded * need["weights"], what,
                     HINT)
        return
    check_memory(need["windows"], what + " (its token windows, on the host)", HINT)
    on_device = need["weights"] + need["optimizer"] + need["activations"] + need["windows"]
    free = torch.cuda.mem_get_info(device)[0]
    if on_device > free:
        raise ConfigError(f"{what} needs about {on_device / 1e9:,.1f} GB of GPU memory; {free / 1e9:,.1f} GB is "
                          f"free on {device}; {HINT}")
