"""Training: the accelerate trainer for dense and MoE causal LMs (`moekit train`, `accelerate launch -m moe.train`).

    options  every option, declared once (`TrainOptions`)
    data     token streams (built-in, text as bytes, .npy ids) and deterministic train / validation windows
    optim    AdamW and the warmup + cosine schedule
    loop     the loop itself: load, train, evaluate, write OUT atomically

It imports `llama` and `moe`. Exports load on first use.

    from moe.train import TrainOptions, train
    result = train(TrainOptions(model="tiny-moe", out="runs/x", steps=100))
"""

from llama._lazy import lazy_exports

_EXPORTS = {
    "MIXED_PRECISION": "options", "TrainOptions": "options",
    "TokenData": "data", "load_tokens": "data",
    "lr_at": "optim", "make_optimizer": "optim",
    "TrainResult": "loop", "evaluate": "loop", "load_model": "loop", "train": "loop",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
