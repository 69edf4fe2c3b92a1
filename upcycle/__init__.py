"""Dense -> MoE upcycling. It imports `moekit.llama` and `moekit.moe`; its modules, each importing only those
listed before it:

    options      what the command asks for (`UpcycleOptions`, `VerifyOptions`)
    recipes      the recipes on tensors (copy, noise, drop, granular, scaling)
    record       upcycling.json, what an upcycled directory records of how it was made
    recipe_file  mergekit-moe YAML and moekit JSON recipe files -> UpcycleOptions
    streamed     a checkpoint run layer by layer from disk in fp32 (`StreamedCheckpoint`)
    routers      routers set from prompts' hidden states (multi-donor merges)
    verify       `moekit verify`: logits of two checkpoints, experts against their donors
    convert      the streaming converter: plan the tensors, write DST, verify (`upcycle`, `upcycle_model`)
    donors       experts from several dense models of one base (`merge_donors`)

    from moekit.upcycle import UpcycleOptions, merge_donors, read_recipe, upcycle, upcycle_model
    upcycle("llama-dir", "moe-dir", UpcycleOptions(num_experts=8, top_k=2, recipe="copy"))
    moe = upcycle_model(dense_llama, UpcycleOptions(recipe="drop", drop_ratio=0.5))
    merge_donors("moe-dir", read_recipe("merge.yml"))  # a mergekit-moe YAML: experts from several models

Exports load on first use.
"""

from moekit.llama._lazy import lazy_exports

_EXPORTS = {
    "plan_upcycle": "convert", "upcycle": "convert", "upcycle_model": "convert", "merge_donors": "donors",
    "read_record": "record", "StreamedCheckpoint": "streamed",
    "RECIPES": "options", "UpcycleOptions": "options", "VerifyOptions": "options",
    "VerifyError": "verify", "VerifyResult": "verify", "verify_checkpoints": "verify", "verify_merged": "verify",
    "read_recipe": "recipe_file",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
