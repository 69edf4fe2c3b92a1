"""What `moekit bench layer` and `moekit bench gemm` are asked to measure, declared once."""

from __future__ import annotations

from dataclasses import dataclass

from llama.options import MAX_SEED, check_options, option

CONTENDERS = ("moekit", "hf-eager", "hf-grouped_mm", "megablocks", "dense-equivalent")
LAYER_PRESETS = {  # option values a preset sets (options given as well override them)
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, top_k=2, dtype="bf16", tokens=[4096, 16384, 65536]),
}
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class LayerBenchOptions:
    """our MoE layer vs transformers' Mixtral block vs a dense SwiGLU

    Forward and forward+backward of one routed SwiGLU layer, side by side: moekit, transformers'
    MixtralSparseMoeBlock with its eager and grouped_mm experts implementations, megablocks' dropless experts (CUDA,
    when installed) and a dense SwiGLU of width k*F (the same active FLOPs). One table per --tokens value. On a GPU:
    moekit bench layer --preset mixtral --device cuda --json PATH."""

    preset: str | None = option(None, "mixtral: Mixtral-8x7B's experts, H=4096 F=14336 E=8 k=2, bf16, 4096 16384 "
                                "65536 tokens (options given as well override it)", choices=tuple(LAYER_PRESETS))
    hidden: int | None = option(None, "H", metavar="H", min=1, default_text="1024")
    ffn: int | None = option(None, "expert width F", metavar="F", min=1, default_text="2816")
    experts: int | None = option(None, "E", metavar="E", min=1, default_text="8")
    top_k: int | None = option(None, "k", metavar="K", min=1, default_text="2")
    tokens: list[int] | None = option(None, "token counts, one table each", metavar="T", min=1, default_text="4096")
    dtype: str | None = option(None, "precision", choices=DTYPES, default_text="fp32 on CPU, bf16 on CUDA")
    device: str = option("auto", "auto (cuda if torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    repeats: int | None = option(None, "timed runs of each contender, round robin", metavar="N", min=1,
                                 default_text="5 on CPU, 10 on CUDA")
    warmup: int | None = option(None, "untimed runs first", metavar="N", min=0, default_text="1 on CPU, 2 on CUDA")
    threads: int | None = option(None, "torch threads", metavar="N", min=1, default_text="torch's")
    only: list[str] | None = option(None, f"time only these contenders, of {', '.join(CONTENDERS)}", metavar="NAME",
                                    choices=CONTENDERS, default_text="all but megablocks on CPU; moekit, "
                                    "hf-grouped_mm, megablocks if installed and dense-equivalent on CUDA")
    json: str | None = option(None, "write the results as JSON to this path", metavar="PATH")

    def __post_init__(self):
        check_options(self)

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
                               min=1)
    hidden: int = option(4096, "H", metavar="H", min=1)
    ffn: int = option(14336, "expert width F", metavar="F", min=1)
    experts: int = option(8, "E", metavar="E", min=1)
    top_k: int = option(2, "k", metavar="K", min=1)
    dtype: str | None = option(None, "precision", choices=DTYPES, default_text="bf16 on CUDA, fp32 on CPU")
    device: str | None = option(None, "cpu or cuda", default_text="cuda if available")
    sections: list[str] = option(default_factory=lambda: ["gemm", "experts"], help="what to time",
                                 choices=("gemm", "experts"))
    passes: list[str] = option(default_factory=lambda: ["fwd", "fwd+bwd"], help="passes to time",
                               choices=("fwd", "fwd+bwd"))
    decode: bool = option(False, "also time the small-token path (CUDA)")
    decode_tokens: list[int] = option(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], help="token counts of "
                                      "--decode", metavar="T", min=1)
    iters: int = option(10, "timed runs", metavar="N", min=1)
    warmup: int = option(3, "untimed runs first", metavar="N", min=0)
    seed: int = option(0, "seed of the random inputs", metavar="N", min=0, max=MAX_SEED)
    json: str = option("runs/bench/gemm.json", "where to write the results", metavar="PATH")

    def __post_init__(self):
        check_options(self)
        if self.top_k > self.experts:
            from llama.errors import ConfigError

            raise ConfigError(f"--top-k {self.top_k} is greater than --experts {self.experts}")
