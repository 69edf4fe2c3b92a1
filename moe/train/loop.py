"""The training loop: a dense Llama or an MoE causal LM with accelerate (`moekit train`, `accelerate launch -m
moe.train`).

nanoGPT-style: plain options with defaults that work on a laptop CPU, one loop read top to bottom. AdamW (weight
decay on >= 2-D weights only), linear warmup then cosine decay to min_lr, gradient accumulation, grad-norm
clipping; for MoE models the loss includes the router losses and the auxiliary-loss-free router bias is updated
once per optimizer step from the step's summed token counts. Host syncs happen only when logging or evaluating.

OUT is built in OUT.tmp-* (metrics.jsonl grows there during training) and renamed at the end: the HF checkpoint,
metrics.jsonl and train_config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from llama.config import LLAMA_PRESETS, LlamaConfig
from llama.errors import CheckpointError, ConfigError
from llama.io import AtomicDir, check_disjoint, config_path, read_config_json, write_json
from llama.model import Llama
from moe.config import MOE_PRESETS, MoEConfig
from moe.model import MoEForCausalLM

from .data import TokenData, load_tokens
from .optim import lr_at, make_optimizer
from .options import TrainOptions

MOE_TYPES = ("moe", "mixtral", "qwen2_moe")



@dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped, train mode off)
    steps: int
    tokens: int  # training tokens seen, all processes
    train_loss: float  # mean loss of the last logging interval (MoE: with router losses)
    val_loss: float  # validation LM loss at the end
    initial_val_loss: float  # ... before the first step
    seconds: float
    metrics: list[dict]
    out: str | None


def load_model(source: str, seed: int = 0, router_bias_rate: float | None = None) -> tuple[nn.Module, str]:
    """A checkpoint directory (Llama or MoE by config.json's model_type) or a preset (random init, seeded)."""
    if os.path.isdir(source):
        path = config_path(source)
        model_type = read_config_json(path).get("model_type")
        if model_type == "llama":
            model = Llama.from_pretrained(source)
        elif model_type in MOE_TYPES:
            model = MoEForCausalLM.from_pretrained(source)
        else:
            raise CheckpointError(f"{path}: model_type '{model_type}' cannot be trained; expected llama, "
                                  "mixtral or qwen2_moe")
        desc = os.path.abspath(source)
    else:
        torch.manual_seed(seed)
        if source.lower() in LLAMA_PRESETS:
            model = Llama(LlamaConfig.from_name(source))
        elif source.lower() in MOE_PRESETS:
            model = MoEForCausalLM(MoEConfig.from_name(source))
        else:
            raise ConfigError(f"{source}: not a checkpoint directory nor a preset; presets: "
                              f"{', '.join(sorted(LLAMA_PRESETS) + sorted(MOE_PRESETS))}")
        desc = f"preset {source}"
    if router_bias_rate is not None and isinstance(model, MoEForCausalLM):
        model.config.router_bias_update_rate = router_bias_rate
    return model.float().train(), desc


@torch.no_grad()
def evaluate(model, data: TokenData, cfg: TrainOptions, accelerator) -> float:
    """Mean validation LM loss (router losses excluded) over the fixed validation windows."""
    model.eval()
    losses = []
    for ids in data.val_batches(cfg.eval_batches, cfg.batch_size, accelerator.process_index,
                                accelerator.num_processes):
        ids = ids.to(accelerator.device)
        out = model(ids, labels=ids)
        losses.append(out.lm_loss if hasattr(out, "lm_loss") else out.loss)
    model.train()
    return accelerator.reduce(torch.stack(losses).mean(), "mean").item()


def _format(model: nn.Module) -> dict:
    """save_pretrained keywords that keep an MoE checkpoint's HF format (mixtral / qwen2_moe) as it was read."""
    if isinstance(model, MoEForCausalLM) and model.config.model_type in ("mixtral", "qwen2_moe"):
        return {"format": model.config.model_type}
    return {}


def save_checkpoint(model: nn.Module, directory: str) -> None:
    """model.save_pretrained into an existing directory, keeping the files already there."""
    tmp = os.path.join(directory, ".checkpoint")
    model.save_pretrained(tmp, force=True, **_format(model))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    shutil.rmtree(tmp)


def train(cfg: TrainOptions, log=print) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.out and os.path.isdir(cfg.model):
        check_disjoint(cfg.model, cfg.out, "MODEL", "--out")
    if cfg.out and os.path.lexists(cfg.out) and not cfg.force:
        raise CheckpointError(f"{os.path.abspath(cfg.out)} already exists; pass --force to overwrite it")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    model, source = load_model(cfg.model, cfg.seed, cfg.router_bias_rate)
    mcfg = model.config
    if cfg.seq_len + 1 > mcfg.max_position_embeddings:
        raise ConfigError(f"seq-len {cfg.seq_len} needs windows of {cfg.seq_len + 1} tokens; the model's "
                          f"max_position_embeddings is {mcfg.max_position_embeddings}")
    ids, data_source = load_tokens(cfg.data, mcfg.vocab_size)
    data = TokenData(ids, cfg.seq_len, cfg.seed, cfg.data)
    is_moe = isinstance(model, MoEForCausalLM)
    set_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    B, A, S = cfg.batch_size, cfg.grad_accum, cfg.seq_len
    tokens_per_step = B * A * world * S

    with ExitStack() as stack:
        tmp = stack.enter_context(AtomicDir(cfg.out, cfg.force)) if cfg.out and main else None
        metrics: list[dict] = []

        def record(entry: dict) -> None:
            metrics.append(entry)
            if tmp:
                with open(os.path.join(tmp, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(entry) + "\n")

        start = time.perf_counter()
        initial_val = val = evaluate(model, data, cfg, accelerator)
        record({"step": 0, "tokens": 0, "val_loss": round(initial_val, 5)})
        sums: dict[str, torch.Tensor] = {}  # running sums on the device since the last log line
        last_log, last_time, train_loss = 0, time.perf_counter(), float("nan")
        bar = tqdm(range(1, cfg.steps + 1), desc="train", unit="step", disable=not (cfg.progress and main))
        for step in bar:
            lr = lr_at(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = data.train_batch(step, B * A, rank, world).to(accelerator.device)  # [A*B, S+1]
            counts = None  # [L_moe, E] token copies per expert, summed over this step's micro-batches
            for i, ids in enumerate(batch.split(B)):  # micro-batches [B, S+1]
                with accelerator.no_sync(model) if i < A - 1 else nullcontext():
                    out = model(ids, labels=ids)
                    accelerator.backward(out.loss / A)
                parts = {"loss": out.loss}
                if is_moe:
                    parts.update(lm_loss=out.lm_loss, aux_loss=out.aux_loss, z_loss=out.z_loss)
                    c = out.router_stats.tokens_per_expert
                    counts = c if counts is None else counts + c
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() / A
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if is_moe and counts is not None:
                counts = accelerator.reduce(counts, "sum")
                if raw.config.router_bias_update_rate:
                    raw.update_router_bias(counts)  # once per optimizer step
                c = counts.float()
                sums["max_load"] = sums.get("max_load", 0) + (c.max(-1).values / c.mean(-1).clamp(min=1e-9)).mean()
            sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float()

            entry = {}
            if step % cfg.log_every == 0 or step == cfg.steps:  # the only host syncs of the loop
                n, now = step - last_log, time.perf_counter()
                means = {k: accelerator.reduce(v / n, "mean").item() for k, v in sums.items()}
                entry = {"lr": lr, **{k: round(v, 5) for k, v in means.items()},
                         "tokens_per_s": round(n * tokens_per_step / (now - last_time), 1)}
                train_loss, sums, last_log, last_time = means["loss"], {}, step, now
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                val = evaluate(model, data, cfg, accelerator)
                entry["val_loss"], last_time = round(val, 5), time.perf_counter()  # tokens/s leaves eval out
            if entry:
                record({"step": step, "tokens": step * tokens_per_step, **entry})
                bar.set_postfix_str(f"loss {train_loss:.4f} val {val:.4f} lr {lr:.2e}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                accelerator.wait_for_everyone()
                if tmp:
                    raw.save_pretrained(os.path.join(tmp, f"step-{step:06d}"), **_format(raw))
        bar.close()
        seconds = time.perf_counter() - start
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
        if tmp:
            save_checkpoint(model, tmp)
            write_json(os.path.join(tmp, "train_config.json"), {
                **dataclasses.asdict(cfg), "source": source, "data_source": data_source,
                "model_type": mcfg.model_type, "parameters": sum(p.numel() for p in model.parameters()),
                "processes": world, "tokens": cfg.steps * tokens_per_step, "seconds": round(seconds, 3),
                "train_loss": train_loss, "initial_val_loss": initial_val, "val_loss": val})
    result = TrainResult(model, cfg.steps, cfg.steps * tokens_per_step, train_loss, val, initial_val, seconds,
                         metrics, os.path.abspath(cfg.out) if cfg.out else None)
    if log and main:
        log(summary_line(result, source))
    return result


def summary_line(r: TrainResult, source: str) -> str:
    where = f"; wrote {r.out}" if r.out else ""
    return (f"trained {source}: {r.steps} steps, {r.tokens:,} tokens in {r.seconds:.1f} s "
            f"({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s); train loss {r.train_loss:.4f}, "
            f"val loss {r.initial_val_loss:.4f} -> {r.val_loss:.4f}{where}")
