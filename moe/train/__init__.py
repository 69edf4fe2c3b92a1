"""Training: the accelerate trainer for dense and MoE causal LMs (`moekit train`; under a launcher
`accelerate launch -m moekit train` or `torchrun -m moekit train`).

    options    every option, declared once (`TrainOptions`)
    tokenizer  the checkpoint's own tokenizer.json (the `tokenizers` library), another one, or bytes
    data       documents -> a cached token stream (.npy memmap); deterministic train / validation windows
    optim      AdamW (routers at their own lr, frozen non-experts) and the warmup + cosine schedule
    metrics    what a log line holds: losses, perplexity, MFU, per-layer expert use; trackers
    state      OUT.partial, the training state, --resume
    source     what is trained: a checkpoint directory or a preset (`load_model`), its data and schedule
    budget     the memory a run needs, estimated before anything large is allocated
    resume     continuing an interrupted run: its options, the newest state that loads, the command
    parallel   beyond replication: device meshes, FSDP2 sharding (--shard-degree), expert parallelism
               (--expert-parallel), gradients, clipping and the gathered checkpoint of a split model
    sharded    a split run's training state through torch.distributed.checkpoint, resharded on load
    loop       the loop itself, in phases: set up or resume, step, log, evaluate, save, publish OUT
    runs       the runs `moekit plot` reads: metrics checked, the model found for FLOPs and layer indices
    plot       PNG plots of runs (`moekit plot`), and routing heatmaps (`moekit eval --routing`)
    sample     completions from a checkpoint with its own tokenizer (`moekit generate`)
    chat       a checkpoint's chat template, rendered as transformers renders it (`moekit generate --chat`)

It imports `moekit.llama`, `moekit.moe` and `moekit.moe.accounting`. Exports load on first use.

    from moekit.moe.train import TrainOptions, train
    result = train(TrainOptions(model="tiny-moe", out="runs/x", steps=100))
"""

from moekit.llama._lazy import lazy_exports

_EXPORTS = {
    "MIXED_PRECISION": "options", "TrainOptions": "options",
    "TokenData": "data", "load_tokens": "data", "ByteTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "Schedule": "optim", "make_optimizer": "optim", "WorkDir": "state",
    "TrainResult": "loop", "evaluate": "loop", "train": "loop", "Source": "source", "load_model": "source",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
