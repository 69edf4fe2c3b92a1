"""What `moekit train` is asked to do: every option of the trainer, declared once (type, default, help, checks)."""

from __future__ import annotations

from dataclasses import dataclass

from llama.errors import ConfigError
from llama.options import MAX_SEED, check_options, option

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainOptions:
    """train a dense or MoE model (accelerate), write a checkpoint and metrics

    Train a dense Llama or MoE causal LM with accelerate (one CPU, or many processes under `accelerate launch -m
    moe.train`): AdamW, warmup + cosine, gradient accumulation, router losses and the once-per-step router bias
    update for MoE. Writes OUT (HF checkpoint, metrics.jsonl, train_config.json) atomically at the end."""

    model: str = option("mini", "checkpoint directory (llama, mixtral, qwen2_moe) or preset (e.g. mini, tiny, "
                        "tiny-moe; random init, seeded)", metavar="MODEL", positional=True)
    out: str | None = option(None, "output directory (must not exist unless --force)", metavar="DIR",
                             required=True)  # None (Python only): write nothing
    data: str = option("builtin:arith", "builtin:arith | UTF-8 text file or directory of .txt (as bytes, vocab >= "
                       "256) | .npy of token ids", metavar="SRC")
    steps: int = option(200, "optimizer steps", metavar="N", min=1)
    batch_size: int = option(8, "sequences per micro-batch per process", metavar="B", min=1)
    seq_len: int = option(128, "tokens predicted per sequence (windows hold seq_len + 1)", metavar="S", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", metavar="A", min=1)
    lr: float = option(3e-3, "peak learning rate", metavar="LR", gt=0, max=1)
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of lr", metavar="R", min=0, max=1)
    warmup: int = option(20, "linear warmup steps", metavar="N", min=0)
    weight_decay: float = option(0.1, "AdamW decay on >= 2-D weights", metavar="WD", min=0, max=1)
    beta1: float = option(0.9, "AdamW beta1", metavar="B1", min=0, lt=1)
    beta2: float = option(0.95, "AdamW beta2", metavar="B2", min=0, lt=1)
    grad_clip: float = option(1.0, "max global grad norm, 0 = off", metavar="NORM", min=0)
    mixed_precision: str = option("no", "autocast dtype", choices=MIXED_PRECISION)
    seed: int = option(0, "seed for init, data and noise", metavar="N", min=0, max=MAX_SEED)
    log_every: int = option(10, "steps between metric lines", metavar="N", min=1)
    eval_every: int = option(50, "steps between validation losses, 0 = start and end only", metavar="N", min=0)
    eval_batches: int = option(4, "validation batches per evaluation", metavar="N", min=1)
    save_every: int = option(0, "intermediate checkpoints OUT/step-N every N steps, 0 = none", metavar="N", min=0)
    router_bias_rate: float | None = option(None, "MoE: auxiliary-loss-free bias step per optimizer step",
                                            metavar="RATE", min=0, default_text="the config's")
    force: bool = option(False, "replace OUT if it exists")
    progress: bool = option(True, "no progress bar")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_options(self)
        if self.out is not None and not self.out.strip():
            raise ConfigError("--out is empty; expected a directory name")
