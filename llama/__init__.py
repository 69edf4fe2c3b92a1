"""The dense core and the ground floor of the house: the Llama config (Hugging Face field names, presets), model
(RMSNorm, RoPE, GQA attention, SwiGLU MLP, a decoder layer that takes any feed-forward module, KV-cache
generation), and what every other room shares: safetensors checkpoint reading and writing (`checkpoint`), atomic
files and directories and config.json reading (`io`), option declarations (`options`) and the errors users see
(`errors`). It imports nothing of moekit's; everything else may import it. Exports load on first use."""

from ._lazy import lazy_exports

_EXPORTS = {
    "LLAMA_PRESETS": "config", "LlamaConfig": "config",
    "MLP": "model", "Attention": "model", "DecoderLayer": "model", "KVCache": "model", "Llama": "model",
    "LlamaModel": "model", "RMSNorm": "model",
    "CheckpointReader": "checkpoint", "ShardedWriter": "checkpoint", "AtomicDir": "io",
    "CheckpointError": "errors", "ConfigError": "errors", "MoekitError": "errors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
