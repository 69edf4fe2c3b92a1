"""Dense -> MoE upcycling: recipes on tensors (`recipes`), the streaming checkpoint converter (`convert`), experts
from several dense models (`donors`) with routers set from prompts (`routers`) and mergekit-moe recipe files
(`recipe_file`), the checks (`verify`) and what the command asks for (`options`). It imports `llama` and `moe`.

    from upcycle import UpcycleOptions, read_recipe, upcycle, upcycle_model, verify_checkpoints
    upcycle("llama-dir", "moe-dir", UpcycleOptions(num_experts=8, top_k=2, recipe="copy"))
    moe = upcycle_model(dense_llama, UpcycleOptions(recipe="drop", drop_ratio=0.5))
    upcycle(None, "moe-dir", read_recipe("merge.yml"))  # a mergekit-moe YAML: experts from several models

Exports load on first use.
"""

from llama._lazy import lazy_exports

_EXPORTS = {
    "plan_upcycle": "convert", "read_record": "convert", "upcycle": "convert", "upcycle_model": "convert",
    "RECIPES": "options", "UpcycleOptions": "options", "VerifyOptions": "options",
    "VerifyError": "verify", "VerifyResult": "verify", "verify_checkpoints": "verify", "verify_merged": "verify",
    "read_recipe": "recipe_file",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
