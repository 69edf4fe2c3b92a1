"""What `moekit train` is asked to do: every option of the trainer, declared once (type, default, help, checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from moekit.llama.errors import ConfigError
from moekit.llama.options import MAX_SEED, check_options, option

MixedPrecision = Literal["no", "bf16", "fp16"]
MIXED_PRECISION = get_args(MixedPrecision)
# From scratch (a preset): nanoGPT-like values that work for small models. Continuing a pretrained checkpoint:
# its final learning rate (Llama 1/2 decay a 3e-4 peak to 10%: 3e-5; a moekit checkpoint records its own), a
# short warm-up for the new router, as sparse upcycling continues at the dense model's final rate.
SCRATCH = dict(lr=3e-3, warmup=20)
CONTINUED = dict(lr=3e-5, warmup_fraction=0.05)


@dataclass
class TrainOptions:
    """train a dense or MoE model (accelerate), write a checkpoint and metrics

    Train a dense Llama or MoE causal LM with accelerate (one CPU, or many processes under `accelerate launch -m
    moekit train` or `torchrun -m moekit train`): AdamW, warmup + cosine, gradient accumulation, router losses and the
    once-per-step router bias update for MoE. Text goes through the checkpoint's own tokenizer. Writes OUT (a
    complete Hugging Face checkpoint with the source's tokenizer files, metrics.jsonl, train_config.json) when
    training ends; a killed run continues with --resume."""

    model: str | None = option(None, "checkpoint directory (llama, mixtral, qwen2_moe) or preset (e.g. mini, tiny, "
                               "tiny-moe; random init, seeded); omitted with --resume", metavar="MODEL",
                               positional=True)
    out: str | None = option(None, "output directory (must not exist unless --force)", metavar="DIR",
                             required=True)  # None (Python only): write nothing
    data: str = option("builtin:arith", "builtin:arith | builtin:python-stdlib(-val) | a text file | a directory of "
                       "text files | .jsonl | a `datasets` directory (save_to_disk) | .npy of token ids", metavar="SRC")
    val_data: str | None = option(None, "held-out validation data (same kinds as --data)", metavar="SRC",
                                  default_text="the last 5% of --data")
    tokenizer: str | None = option(None, "tokenizer.json, a directory holding one, or 'bytes'", metavar="TOK",
                                   default_text="the checkpoint's own; bytes for presets")
    text_field: str = option("text", ".jsonl / datasets: the field holding the text", metavar="NAME")
    doc_separator: str | None = option(None, "the special token that follows every document (e.g. "
                                       "'<|endoftext|>')", metavar="TOKEN",
                                       default_text="BOS before each document where the tokenizer starts with one; "
                                       "else <|endoftext|> / <|end_of_text|> if it has one, else its EOS")
    token_cache: str | None = option(None, "where tokenised data is cached (.npy memmaps keyed by tokenizer and "
                                     "data hashes)", metavar="DIR", default_text="$XDG_CACHE_HOME/moekit/tokens")
    steps: int = option(200, "optimizer steps", metavar="N", min=1)
    batch_size: int = option(8, "sequences per micro-batch per process", metavar="B", min=1)
    seq_len: int = option(128, "tokens predicted per sequence (windows hold seq_len + 1)", metavar="S", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", metavar="A", min=1)
    lr: float | None = option(None, "peak learning rate", metavar="LR", gt=0, max=1,
                              default_text="3e-3 from a preset; from a checkpoint its final lr (3e-5 if unknown)")
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of lr", metavar="R", min=0, max=1)
    warmup: int | None = option(None, "linear warmup steps", metavar="N", min=0,
                                default_text="20 from a preset, 5% of --steps from a checkpoint")
    weight_decay: float = option(0.1, "AdamW decay on >= 2-D weights", metavar="WD", min=0, max=1)
    beta1: float = option(0.9, "AdamW beta1", metavar="B1", min=0, lt=1)
    beta2: float = option(0.95, "AdamW beta2", metavar="B2", min=0, lt=1)
    grad_clip: float = option(1.0, "max global grad norm, 0 = off", metavar="NORM", min=0)
    mixed_precision: MixedPrecision = option("no", "autocast dtype")
    save_dtype: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", "dtype of the written weights",
                             default_text="auto: the source checkpoint's; fp32 for presets")
    seed: int = option(0, "seed for init, data and noise", metavar="N", min=0, max=MAX_SEED)
    train: Literal["all", "experts"] = option("all", "MoE: train all weights, or only the experts and routers")
    router_lr_mult: float = option(1.0, "MoE: the routers' learning rate as a multiple of --lr", metavar="X", gt=0,
                                   max=1000)
    balance: Literal["micro", "global"] = option("micro", "MoE: load-balancing token fractions per micro-batch, or "
                                                 "all-reduced over the processes (global)")
    aux_loss_coef: float | None = option(None, "MoE: load-balancing loss weight", metavar="C", min=0, max=100,
                                         default_text="the config's router_aux_loss_coef")
    z_loss_coef: float | None = option(None, "MoE: router z-loss weight", metavar="C", min=0, max=100,
                                       default_text="the config's router_z_loss_coef")
    router_bias_rate: float | None = option(None, "MoE: auxiliary-loss-free bias step per optimizer step",
                                            metavar="RATE", min=0, max=1, default_text="the config's")
    shard_degree: int = option(1, "processes that shard each weight, its gradient and optimizer state (FSDP2); "
                               "the number of processes: fully sharded, 1: replicated", metavar="S", min=1)
    expert_parallel: int = option(1, "processes that split each MoE layer's experts between them (E/N each), "
                                  "tokens sent to their experts' process", metavar="N", min=1)
    activation_checkpointing: bool = option(False, "recompute each decoder layer in backward instead of keeping "
                                            "its activations")
    collective_timeout: int = option(1800, "seconds a process waits in a collective (all-reduce, all-to-all) for "
                                     "the others before the run stops with an error", metavar="SECONDS", min=10)
    log_every: int = option(10, "steps between metric lines", metavar="N", min=1)
    eval_every: int = option(50, "steps between validation losses, 0 = start and end only", metavar="N", min=0)
    eval_batches: int = option(4, "validation batches per evaluation", metavar="N", min=1)
    save_every: int = option(0, "every N steps: a checkpoint OUT/step-N and the training state for --resume, "
                             "0 = none", metavar="N", min=0)
    keep_last: int = option(2, "training states kept for --resume", metavar="K", min=1)
    peak_flops: float | None = option(None, "peak FLOP/s of one device, for MFU", metavar="FLOPS", gt=0,
                                      default_text="known GPUs by name; n/a on CPU")
    report_to: Literal["none", "tensorboard", "trackio", "wandb", "all-installed"] = option(
        "none", "also log metrics to this tracker, or to every one installed")
    resume: bool = option(False, "continue the interrupted run in OUT.partial (its options are read back)")
    force: bool = option(False, "replace OUT (and an interrupted run in OUT.partial) if it exists")
    progress: bool = option(True, "no progress bar")

    # Options a resumed run may change: they do not alter the computation.
    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {"out", "resume", "force", "progress", "log_every", "eval_every", "save_every", "keep_last", "report_to",
         "token_cache", "peak_flops", "shard_degree", "expert_parallel", "activation_checkpointing",
         "collective_timeout"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_options(self)
        if self.out is not None and not self.out.strip():
            raise ConfigError("--out is empty; expected a directory name")
        if self.model is None and not self.resume:
            raise ConfigError("MODEL is required (a checkpoint directory or a preset), unless --resume")
        if self.shard_degree > 1 and self.mixed_precision == "fp16":
            raise ConfigError("--shard-degree with --mixed-precision fp16 is not supported; expected bf16 or no")
        if self.resume and not self.out:
            raise ConfigError("--resume needs --out: the run to continue is OUT.partial")


@dataclass
class TokenizerOptions:
    """train a byte-level BPE tokenizer on text

    Train a byte-level BPE tokenizer with the `tokenizers` library on text data (the sources `moekit train --data`
    reads, e.g. builtin:python-stdlib or a directory of files) and write OUT/tokenizer.json and a
    tokenizer_config.json that transformers reads. Its one special token, <|endoftext|>, ends each document."""

    data: str | None = option(None, "text to learn from (as moekit train --data)", metavar="DATA", positional=True)
    out: str | None = option(None, "output directory (must not exist unless --force)", metavar="DIR", required=True)
    vocab_size: int = option(4096, "ids in the vocabulary, special token included", metavar="N", min=257,
                             max=1_000_000)
    text_field: str = option("text", ".jsonl / datasets: the field holding the text", metavar="NAME")
    force: bool = option(False, "replace OUT if it exists")
    progress: bool = option(True, "no progress bar")

    def __post_init__(self):
        check_options(self)
        if not self.data:
            raise ConfigError("DATA is required: the text to train the tokenizer on")


@dataclass
class GenerateOptions:
    """complete prompts with a checkpoint and its own tokenizer

    Continue each --prompt with the checkpoint MODEL (dense or MoE; its tokenizer.json), greedily by default, and
    print the completions. Where MODEL has a chat template (chat_template.jinja, or tokenizer_config.json's
    chat_template) each prompt is a user message (after --system) in that template, as transformers'
    apply_chat_template writes it, and the reply ends at the end-of-turn token; --no-chat feeds raw text."""

    model: str | None = option(None, "checkpoint directory with a tokenizer.json", metavar="MODEL", positional=True)
    prompt: list[str] = option(default_factory=lambda: ["def "], help="prompts to complete", metavar="TEXT")
    max_new_tokens: int = option(40, "tokens to generate per prompt", metavar="N", min=1, max=100_000)
    temperature: float = option(0.0, "0 = greedy; above 0 samples", metavar="T", min=0, max=100)
    top_k: int | None = option(None, "sample from the k likeliest tokens", metavar="K", min=1)
    top_p: float = option(1.0, "sample from the likeliest tokens whose probabilities add up to P (nucleus); "
                          "1 = off; needs --temperature", metavar="P", gt=0, max=1)
    repetition_penalty: float = option(1.0, "divide the positive logits of tokens already in the text (prompt "
                                       "included) by R and multiply the others (CTRL); 1 = off", metavar="R", min=1)
    chat: bool | None = option(None, "put each prompt through MODEL's chat template (the default where it has one "
                               "that opens the model's turn)")
    no_chat: bool = option(False, "feed each prompt as raw text, not through the chat template")
    system: str | None = option(None, "a system message before each prompt (chat only)", metavar="TEXT")
    seed: int = option(0, "seed for sampling", metavar="N", min=0, max=MAX_SEED)
    json: bool = option(False, "print the completions as JSON")

    def __post_init__(self):
        check_options(self)
        if not self.model:
            raise ConfigError("MODEL is required: a checkpoint directory")
        if self.chat and self.no_chat:
            raise ConfigError("--chat and --no-chat contradict each other; give one")
        if self.no_chat and self.system is not None:
            raise ConfigError("--system goes through the chat template, which --no-chat turns off; drop one")
        if self.top_p < 1 and self.temperature == 0:
            raise ConfigError(f"--top-p {self.top_p:g} needs --temperature above 0: greedy decoding takes the "
                              "likeliest token whatever P")

    def use_chat(self) -> bool | None:
        """True (--chat), False (--no-chat) or None (the checkpoint decides)."""
        return False if self.no_chat else self.chat


@dataclass
class PlotOptions:
    """plot training runs: loss curves, expert load, learning rate and throughput (PNG)

    Read the metrics.jsonl (and train_config.json) of finished runs (OUT) or runs in progress (OUT.partial) and
    write PNG files to DIR: loss.png (train and validation loss against training tokens and training FLOPs, the
    runs overlaid), lr_throughput.png (learning rate and tokens/s against steps) and, for each MoE run,
    experts-NAME.png (per MoE layer, each expert's share of the token copies over the steps) and load-NAME.png
    (max/mean load, dead experts and router entropy per layer). Needs matplotlib (pip install 'moekit[plot]')."""

    runs: list[str] = option(help="training runs: `moekit train` output directories (OUT, or OUT.partial of a run "
                             "in progress) holding metrics.jsonl", metavar="RUN", positional=True)
    out: str | None = option(None, "directory for the PNG files (must not exist unless --force)", metavar="DIR",
                             required=True)
    force: bool = option(False, "replace DIR if it exists")

    def __post_init__(self):
        check_options(self)
        if not self.out or not self.out.strip():
            raise ConfigError("--out is empty; expected a directory name")
