"""What `moekit eval` is asked to do: every option declared once (type, default, help, checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moekit.llama.errors import ConfigError
from moekit.llama.options import check_options, option


@dataclass
class EvalOptions:
    """score checkpoints on text (loss, bits per byte, intervals), see where tokens go, run lm-eval tasks

    Each MODEL (a dense or MoE checkpoint directory with its tokenizer.json) reads each --data spec through its own
    tokenizer; per (model, data): tokens, bytes, mean loss (nats/token), perplexity and bits per byte (comparable
    across tokenizers), each with a 95% bootstrap interval over documents; long documents in sliding windows.
    --routing adds, for MoE models, the share of each data label's token copies per layer and expert and the mutual
    information between label and expert. --tasks runs lm-evaluation-harness tasks on moekit's model (the eval
    extra: pip install 'moekit[eval]')."""

    models: list[str] = option(help="checkpoint directories (dense or MoE) with their tokenizer.json", metavar="MODEL",
                               positional=True)
    data: list[str] | None = option(None, "text to score, as LABEL=SPEC or SPEC: a text file, a directory of text "
                                    "files, .jsonl, a datasets directory, builtin:python-stdlib-val, ...",
                                    metavar="SPEC")
    text_field: str = option("text", ".jsonl / datasets: the field holding the text", metavar="NAME")
    max_documents: int | None = option(None, "score only the first N documents of each spec (a quick look)",
                                       metavar="N", min=1, default_text="all")
    max_length: int | None = option(None, "tokens per window", metavar="N", min=2,
                                    default_text="the model's max_position_embeddings, at most 2048")
    stride: int | None = option(None, "tokens between window starts (each window scores the tokens the previous "
                                "did not)", metavar="N", min=1, default_text="half the window")
    batch_size: int = option(8, "windows per forward", metavar="B", min=1)
    dtype: Literal["fp32", "bf16"] = option("fp32", "weights and activations")
    routing: bool = option(False, "MoE: where each data label's tokens go, per layer and expert, and the mutual "
                           "information between label and expert")
    out: str | None = option(None, "also write results.json and, with --routing, a heatmap per model "
                             "(routing-NAME.png) here (must not exist unless --force)", metavar="DIR")
    tasks: list[str] | None = option(None, "lm-evaluation-harness tasks run on moekit's model (names, or tasks of "
                                     "--include-path)", metavar="TASK")
    include_path: str | None = option(None, "--tasks: a directory of lm-eval task YAML files (local data)",
                                      metavar="DIR")
    limit: int | None = option(None, "--tasks: at most N samples per task", metavar="N", min=1)
    num_fewshot: int | None = option(None, "--tasks: few-shot examples per sample", metavar="K", min=0)
    seed: int = option(0, "seed of the bootstrap", metavar="N", min=0)
    force: bool = option(False, "replace --out DIR if it exists")
    progress: bool = option(True, "no progress bar")

    def __post_init__(self):
        check_options(self)
        if not self.models:
            raise ConfigError("MODEL is required: one or more checkpoint directories")
        if not self.data and not self.tasks:
            raise ConfigError("nothing to evaluate: give --data SPEC ... (text to score) or --tasks TASK ...")
        if self.routing and not self.data:
            raise ConfigError("--routing reads the --data specs: give --data LABEL=SPEC ...")
        for name in ("include_path", "limit", "num_fewshot"):
            if getattr(self, name) is not None and not self.tasks:
                raise ConfigError(f"--{name.replace('_', '-')} is an option of --tasks")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise ConfigError(f"--stride {self.stride} is longer than the window (--max-length {self.max_length}); "
                              "tokens between windows would go unscored")
