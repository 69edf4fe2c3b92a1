"""The dense Llama core: config and presets, model, generation, Hugging Face checkpoint I/O."""

from .checkpoint import AtomicDir, CheckpointReader, ShardedWriter
from .config import LLAMA_PRESETS, LlamaConfig
from .errors import CheckpointError, ConfigError, MoekitError
from .model import MLP, Attention, DecoderLayer, KVCache, Llama, LlamaModel, RMSNorm

__all__ = ["LLAMA_PRESETS", "MLP", "AtomicDir", "Attention", "CheckpointError", "CheckpointReader", "ConfigError",
           "DecoderLayer", "KVCache", "Llama", "LlamaConfig", "LlamaModel", "MoekitError", "RMSNorm", "ShardedWriter"]
