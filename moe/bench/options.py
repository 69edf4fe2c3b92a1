"""What `moekit bench layer`, `moekit bench gemm` and `moekit bench train` are asked to measure, declared once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

from moekit.llama.errors import ConfigError
from moekit.llama.options import MAX_SEED, check_options, option

LayerContender = Literal["moekit", "hf-eager", "hf-grouped_mm", "megablocks", "dense-equivalent"]
CONTENDERS = get_args(LayerContender)
LAYER_PRESETS = {  # option values a preset sets (options given as well override them)
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, top_k=2, dtype="bf16", tokens=[4096, 16384, 65536]),
}
Dtype = Literal["fp32", "bf16", "fp16"]
MAX_SIZE = 2**31  # a bound on every shape option: memory estimates stay exact and printable (they refuse far below)
MAX_LAYERS = 100_000


def check_threads(threads: int | None) -> None:
    """Refuse --threads above this machine's cores (torch's thread pool crashes far above them)."""
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        raise ConfigError(f"--threads {threads} is more than this machine's {cores} cores; expected 1 to {cores}")


@dataclass
class LayerBenchOptions:
    """our MoE layer vs transformers' Mixtral block vs a dense SwiGLU

    Forward and forward+backward of one routed SwiGLU layer, side by side: moekit, transformers'
    MixtralSparseMoeBlock with its eager and grouped_mm experts implementations, megablocks' dropless experts (CUDA,
    when installed) and a dense SwiGLU of width k*F (the same active FLOPs). One table per --tokens value. On a GPU:
    moekit bench layer --preset mixtral --device cuda --json PATH."""

    preset: Literal[tuple(LAYER_PRESETS)] | None = option(
        None, "mixtral: Mixtral-8x7B's experts, H=4096 F=14336 E=8 k=2, bf16, 4096 16384 65536 tokens (options given "
        "as well override it)")
    hidden: int | None = option(None, "H", metavar="H", min=1, max=MAX_SIZE, default_text="1024")
    ffn: int | None = option(None, "expert width F", metavar="F", min=1, max=MAX_SIZE,
                             default_text="2816")
    experts: int | None = option(None, "E", metavar="E", min=1, max=MAX_SIZE, default_text="8")
    top_k: int | None = option(None, "k", metavar="K", min=1, max=MAX_SIZE, default_text="2")
    tokens: list[int] | None = option(None, "token counts, one table each", metavar="T", min=1, max=MAX_SIZE,
                                      default_text="4096")
    dtype: Dtype | None = option(None, "precision", default_text="fp32 on CPU, bf16 on CUDA")
    device: str = option("auto", "auto (cuda if torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    repeats: int | None = option(None, "timed runs of each contender, round robin", metavar="N", min=1,
                                 default_text="5 on CPU, 10 on CUDA")
    warmup: int | None = option(None, "untimed runs first", metavar="N", min=0, default_text="1 on CPU, 2 on CUDA")
    threads: int | None = option(None, "torch threads", metavar="N", min=1, default_text="torch's")
    only: list[LayerContender] | None = option(None, f"time only these contenders, of {', '.join(CONTENDERS)}",
                                               metavar="NAME", default_text="all but megablocks on CPU; moekit, "
                                               "hf-grouped_mm, megablocks if installed and dense-equivalent on CUDA")
    json: str | None = option(None, "write the results as JSON to this path", metavar="PATH")
    force: bool = option(False, "replace --json if it exists (a regular file)")

    def __post_init__(self):
        check_options(self)
        check_threads(self.threads)

    def layer_kwargs(self) -> dict:
        """bench_layer's keyword arguments: the preset's values, then the options given (None: not given)."""
        names = dict(hidden="hidden_size", ffn="intermediate_size", experts="num_experts", top_k="top_k",
                     tokens="tokens", dtype="dtype", repeats="repeats", warmup="warmup")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return {names[k]: v for k, v in {**LAYER_PRESETS.get(self.preset or "", {}), **given}.items()}


@dataclass
class GemmBenchOptions:
    """grouped-GEMM kernels vs torch's grouped_mm vs a dense matmul

    The expert GEMMs of a routed layer, ours against torch's grouped_mm and a dense matmul with the same FLOPs,
    forward and forward+backward (Triton rows on CUDA; torch rows on CPU)."""

    tokens: list[int] = option(default_factory=lambda: [4096, 16384, 65536], help="token counts T", metavar="T",
                               min=1, max=MAX_SIZE)
    hidden: int = option(4096, "H", metavar="H", min=1, max=MAX_SIZE)
    ffn: int = option(14336, "expert width F", metavar="F", min=1, max=MAX_SIZE)
    experts: int = option(8, "E", metavar="E", min=1, max=MAX_SIZE)
    top_k: int = option(2, "k", metavar="K", min=1, max=MAX_SIZE)
    dtype: Dtype | None = option(None, "precision", default_text="bf16 on CUDA, fp32 on CPU")
    device: str | None = option(None, "cpu or cuda", default_text="cuda if available")
    sections: list[Literal["gemm", "experts"]] = option(default_factory=lambda: ["gemm", "experts"],
                                                        help="what to time")
    passes: list[Literal["fwd", "fwd+bwd"]] = option(default_factory=lambda: ["fwd", "fwd+bwd"],
                                                     help="passes to time")
    decode: bool = option(False, "also time the small-token path (CUDA)")
    decode_tokens: list[int] = option(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], help="token counts of "
                                      "--decode", metavar="T", min=1, max=MAX_SIZE)
    iters: int = option(10, "timed runs", metavar="N", min=1)
    warmup: int = option(3, "untimed runs first", metavar="N", min=0)
    seed: int = option(0, "seed of the random inputs", metavar="N", min=0, max=MAX_SEED)
    json: str | None = option(None, "write the results as JSON to this path", metavar="PATH")
    force: bool = option(False, "replace --json if it exists (a regular file)")

    def __post_init__(self):
        check_options(self)
        if self.top_k > self.experts:
            raise ConfigError(f"--top-k {self.top_k} is greater than --experts {self.experts}")


TrainContender = Literal["moekit", "hf-grouped_mm", "hf-eager", "hf-batched_mm"]
TRAIN_CONTENDERS = get_args(TrainContender)
TRAIN_DEFAULTS = dict(layers=4, hidden=512, ffn=1408, experts=8, top_k=2, heads=8, kv_heads=2, vocab=8192, batch=8,
                      seq_len=256, dtype="fp32")
TRAIN_PRESETS = {  # ~1B active (1.05B matmul weights per token; 3.6B in all), as a GPU measures it
    "1b": dict(layers=12, hidden=2048, ffn=5632, experts=8, top_k=2, heads=16, kv_heads=8, vocab=32000, batch=8,
               seq_len=2048, dtype="bf16"),
}


@dataclass
class TrainBenchOptions:
    """training steps of one MoE model: moekit vs transformers' Mixtral

    Tokens/s (and MFU where a peak is known) of full training steps (forward with the LM and load-balancing
    losses, backward, gradient clipping, AdamW) of the same MoE model through moekit's MoEForCausalLM and through
    transformers' MixtralForCausalLM with each experts implementation, on the same weights, batch, AdamW and
    precision, round robin; then a torch.profiler breakdown of one step of each: the share in matrix
    multiplications and the time outside them. On a GPU: moekit bench train --preset 1b --json PATH."""

    preset: Literal[tuple(TRAIN_PRESETS)] | None = option(
        None, "1b: about 1B active parameters (12 layers, H=2048, F=5632, 8 experts top-2, 16 heads / 8 KV, "
        "vocabulary 32000, batch 8 x 2048, bf16); options given as well override it")
    layers: int | None = option(None, "decoder layers (all MoE)", metavar="L", min=1, max=MAX_LAYERS,
                                default_text="4")
    hidden: int | None = option(None, "H", metavar="H", min=1, max=MAX_SIZE, default_text="512")
    ffn: int | None = option(None, "expert width F", metavar="F", min=1, max=MAX_SIZE,
                             default_text="1408")
    experts: int | None = option(None, "E", metavar="E", min=1, max=MAX_SIZE, default_text="8")
    top_k: int | None = option(None, "k", metavar="K", min=1, max=MAX_SIZE, default_text="2")
    heads: int | None = option(None, "attention heads", metavar="N", min=1, max=MAX_SIZE,
                               default_text="8")
    kv_heads: int | None = option(None, "key/value heads", metavar="N", min=1, max=MAX_SIZE,
                                  default_text="2")
    vocab: int | None = option(None, "vocabulary size", metavar="V", min=2, max=MAX_SIZE,
                               default_text="8192")
    batch: int | None = option(None, "sequences per step", metavar="B", min=1, max=MAX_SIZE,
                               default_text="8")
    seq_len: int | None = option(None, "tokens per sequence", metavar="S", min=2, max=MAX_SIZE,
                                 default_text="256")
    dtype: Literal["fp32", "bf16"] | None = option(None, "parameters, activations and AdamW states",
                                                   default_text="fp32")
    device: str = option("auto", "auto (cuda if torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    repeats: int | None = option(None, "timed steps of each contender, round robin", metavar="N", min=1,
                                 default_text="5 on CPU, 10 on CUDA")
    warmup: int | None = option(None, "untimed steps first", metavar="N", min=0, default_text="1 on CPU, 2 on CUDA")
    threads: int | None = option(None, "torch threads", metavar="N", min=1, default_text="torch's")
    only: list[TrainContender] | None = option(None, f"time only these contenders, of {', '.join(TRAIN_CONTENDERS)} "
                                               "(hf-batched_mm gathers a weight copy per token copy: small sizes "
                                               "only)", metavar="NAME",
                                               default_text="moekit, hf-grouped_mm and (on CPU) hf-eager")
    adamw: Literal["fused", "foreach", "loop"] = option("fused", "AdamW implementation of every contender (moekit's "
                                                        "trainer: fused)")
    peak_flops: float | None = option(None, "peak FLOP/s of the device, for MFU", metavar="FLOPS", gt=0,
                                      default_text="known GPUs by name; n/a on CPU")
    profile_steps: int = option(3, "steps of each contender under torch.profiler, for the time in matrix "
                                "multiplications; 0 = none", metavar="N", min=0)
    seed: int = option(0, "seed of the weights and the batch", metavar="N", min=0, max=MAX_SEED)
    json: str | None = option(None, "write the results as JSON to this path", metavar="PATH")
    force: bool = option(False, "replace --json if it exists (a regular file)")

    def __post_init__(self):
        check_options(self)
        check_threads(self.threads)

    def model_kwargs(self) -> dict:
        """The defaults, then the preset's values, then the options given."""
        given = {k: getattr(self, k) for k in TRAIN_DEFAULTS if getattr(self, k) is not None}
        kw = {**TRAIN_DEFAULTS, **TRAIN_PRESETS.get(self.preset or "", {}), **given}
        if kw["top_k"] > kw["experts"]:
            raise ConfigError(f"--top-k {kw['top_k']} is greater than --experts {kw['experts']}")
        if kw["heads"] % kw["kv_heads"] or kw["hidden"] % kw["heads"]:
            raise ConfigError(f"--heads {kw['heads']} must divide --hidden {kw['hidden']} and be a multiple of "
                              f"--kv-heads {kw['kv_heads']}")
        return kw
