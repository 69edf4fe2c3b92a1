"""Accounting: exact total and active-per-token parameters by component, and what they cost.

    formulas  one exact formula per Hugging Face model_type, from config.json dicts (no torch); the families in
              formulas_moe (GQA MoE), formulas_gqa (more GQA MoE), formulas_mla (DeepSeek family),
              formulas_hybrid (Mamba / linear-attention hybrids), built from the pieces in blocks
    sources   what can be counted: presets, config.json files, checkpoint directories (safetensors headers
              only), live modules (MoE-aware by duck typing), bare counts such as 7B
    cost      FLOPs per token, training FLOPs, weight / KV-cache / training memory, time and price (`Plan`)
    report    the table and JSON of `moekit params`

It imports `llama` and `moe`'s config; nothing here needs the model's weights. Exports load on first use.

    from moekit.moe.accounting import Plan, count_params, derive
    derive(count_params("mixtral-8x7b"), Plan(tokens=1e12, gpus=64, peak_flops=989e12, mfu=0.4)).figures
"""

from moekit.llama._lazy import lazy_exports

_EXPORTS = {
    "COMPONENTS": "formulas", "FORMULAS": "formulas", "SUPPORTED_MODEL_TYPES": "formulas", "Arch": "formulas",
    "ParamCount": "formulas", "count_config": "formulas",
    "classify": "sources", "count_checkpoint": "sources", "count_module": "sources", "count_params": "sources",
    "preset_names": "sources",
    "parse_number": "cost", "DTYPE_BYTES": "cost", "Figure": "cost", "Plan": "cost", "Report": "cost",
    "derive": "cost",
    "as_json": "report", "render_table": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
