"""Dense -> MoE upcycling: recipes on tensors (`recipes`), the streaming checkpoint converter (`convert`) and the
function-preservation check (`verify`).

    from upcycle import UpcycleOptions, upcycle, upcycle_model, verify_checkpoints
    upcycle("llama-dir", "moe-dir", UpcycleOptions(num_experts=8, top_k=2, recipe="copy"))
    moe = upcycle_model(dense_llama, UpcycleOptions(recipe="drop", drop_ratio=0.5))
"""

from .convert import plan_upcycle, read_record, upcycle, upcycle_model
from .options import RECIPES, UpcycleOptions
from .verify import VerifyError, VerifyResult, verify_checkpoints

__all__ = ["RECIPES", "UpcycleOptions", "VerifyError", "VerifyResult", "plan_upcycle", "read_record", "upcycle",
           "upcycle_model", "verify_checkpoints"]
