"""Dense -> MoE upcycling: recipes on tensors (`recipes`), the streaming checkpoint converter (`convert`), the
function-preservation check (`verify`) and what the command asks for (`options`). It imports `llama` and `moe`.

    from upcycle import UpcycleOptions, upcycle, upcycle_model, verify_checkpoints
    upcycle("llama-dir", "moe-dir", UpcycleOptions(num_experts=8, top_k=2, recipe="copy"))
    moe = upcycle_model(dense_llama, UpcycleOptions(recipe="drop", drop_ratio=0.5))

Exports load on first use.
"""

from llama._lazy import lazy_exports

_EXPORTS = {
    "plan_upcycle": "convert", "read_record": "convert", "upcycle": "convert", "upcycle_model": "convert",
    "RECIPES": "options", "UpcycleOptions": "options", "VerifyOptions": "options",
    "VerifyError": "verify", "VerifyResult": "verify", "verify_checkpoints": "verify",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
