"""Router biases and routing-score correction terms, in every MoE formula, module walk and checkpoint: the total
equals transformers' `sum(p.numel() for p in model.parameters())` of the model built on the meta device, a
correction bias that transformers holds as a frozen nn.Parameter (ERNIE 4.5, AFMoE, Laguna) included, under
router; a persistent buffer of router state is reported in `buffers`, apart from the totals."""

import pytest
import test_moe_accounting_formulas_gqa as gqa
import test_moe_accounting_formulas_hybrid as hybrid
import test_moe_accounting_formulas_mla as mla
import test_moe_accounting_formulas_moe as moe
import torch
from test_moe_accounting_sources import HF_CASES

from moekit.moe import MoEConfig, MoEForCausalLM
from moekit.moe.accounting import count_checkpoint, count_config, count_module

from helpers import Reference

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0, head_dim=8, moe_intermediate_size=8, num_experts_per_tok=2)

# transformers holds their correction bias as nn.Parameter(requires_grad=False):
# name: (model_type, k, config, routed layers, E)
FROZEN = {
    # modeling_ernie4_5_moe.Ernie4_5_MoeStatics.e_score_correction_bias [1, E]; layers 1 and 2 routed
    "ernie4_5_moe": ("ernie4_5_moe", 2, dict(TINY, intermediate_size=24, moe_num_experts=4, moe_k=2,
                                             moe_num_shared_experts=2, moe_layer_start_index=1,
                                             moe_layer_end_index=2, use_bias=True), 2, 4),
    # modeling_afmoe.AfmoeSparseMoeBlock.expert_bias [E]; layers 0 and 1 dense
    "afmoe": ("afmoe", 2, dict(TINY, intermediate_size=24, num_experts=4, num_shared_experts=1, num_dense_layers=2,
                               global_attn_every_n_layers=2, attention_bias=True), 2, 4),
    # modeling_laguna.LagunaTopKRouter.e_score_correction_bias [E]; layer 0 dense
    "laguna": ("laguna", 2, dict(TINY, intermediate_size=24, num_experts=4, shared_expert_intermediate_size=12,
                                 num_attention_heads_per_layer=[4, 2, 4, 6]), 3, 4),
    "laguna-channel-gate": ("laguna", 2, dict(TINY, intermediate_size=24, num_experts=4, gating="per-channel",
                                              shared_expert_intermediate_size=12), 3, 4),
}
# every MoE formula's tiny config: the other test modules' cases, the frozen ones, and the families counted there
# from released configs only
CASES = {**moe.CASES, **gqa.CASES, **mla.CASES, **hybrid.CASES, **{n: c[:3] for n, c in FROZEN.items()},
         **{n: (n.split("-")[0], None, c) for n, c in HF_CASES.items()
            if n.split("-")[0] in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx")}}
ROUTER_STATE = ("e_score_correction_bias", "expert_bias")
# persistent buffers derived from the config, not router state: MiniMax-Text-01's lightning-attention decay tables
DERIVED = {"inv_freq", "original_inv_freq", "slope_rate", "query_decay", "key_decay", "diagonal_decay"}


def persistent_buffers(model) -> dict[str, int]:
    """{buffer name: elements} of the buffers a checkpoint stores (state_dict), summed over layers."""
    out = {}
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[name] = out.get(name, 0) + b.numel()
    return out


def meta_model(model_type: str, config: dict):
    return Reference(model_type, 1, **config).model  # skips where transformers lacks the model type


@pytest.mark.parametrize("name", CASES)
def test_total_is_transformers_parameter_count_and_router_buffers_are_reported(name):
    model_type, _, config = CASES[name]
    model = meta_model(model_type, config)
    c = count_config(dict(config, model_type=model_type))
    # LongCat: transformers allocates gate_up_proj rows [2·Fe, H] for its Z zero-computation experts in each of
    # the L layers; they are never used, and checkpoints and the formula leave them out
    unused = 2 * 2 * 2 * 8 * 16 if model_type == "longcat_flash" else 0
    assert c.total_params == sum(p.numel() for p in model.parameters()) - unused
    stored = persistent_buffers(model)
    assert c.buffers == {n: v for n, v in stored.items() if n in ROUTER_STATE}
    assert set(stored) <= {*ROUTER_STATE, *DERIVED}  # no other stored state goes uncounted


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_correction_bias_counts_under_router(name):
    model_type, k, config, layers, E = FROZEN[name]
    ref = Reference(model_type, k, **config)
    frozen = sum(p.numel() for p in ref.model.parameters() if not p.requires_grad)
    assert frozen == layers * E and ref.buffers == 0  # a parameter, frozen or not, is no buffer
    for cfg in (dict(config, model_type=model_type), ref.config.to_dict()):
        c = count_config(cfg)
        assert (c.total_params, c.active_params, c.buffers) == (ref.total, ref.active, {})
    H = config["hidden_size"]
    assert c.total["router"] == c.active["router"] == layers * (E * H + E)  # gate weight [E, H] + bias [E]
    assert c.active["routed_experts"] == layers * k * 3 * H * 8


@pytest.mark.parametrize("name", FROZEN)
def test_module_walk_counts_frozen_correction_bias(name):
    model_type, k, config, layers, E = FROZEN[name]
    model = meta_model(model_type, config)
    c, m = count_config(dict(config, model_type=model_type)), count_module(model)
    assert (m.total_params, m.buffers) == (c.total_params, c.buffers) == (
        sum(p.numel() for p in model.parameters()), {})
    assert (m.total, m.active) == (c.total, c.active)  # component by component
    assert m.total["router"] == layers * (E * config["hidden_size"] + E)
    assert "config formula agrees exactly" in m.notes


@pytest.mark.parametrize("name", CASES)
def test_module_walk_total_is_transformers_parameter_count(name):
    """The module walk follows the same rule on every MoE model: every parameter counts, frozen or not; a
    persistent router buffer is reported apart."""
    model_type, _, config = CASES[name]
    model = meta_model(model_type, config)
    m = count_module(model)  # LongCat's unused zero-expert rows included: the module holds them
    assert m.total_params == sum(p.numel() for p in model.parameters())
    assert m.buffers == {n: v for n, v in persistent_buffers(model).items() if n in ROUTER_STATE}


def tiny_checkpoint(model_type: str, config: dict, path):
    """A tiny random transformers model, saved as transformers saves it (save_pretrained: safetensors, with the
    checkpoint names of the model type's conversion mapping)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config))
    model.save_pretrained(path)
    return model


# the name each checkpoint stores its routing-score correction bias under (transformers renames it on load)
STORED_AS = {"ernie4_5_moe": "model.layers.1.mlp.moe_statics.e_score_correction_bias",
             "afmoe": "model.layers.2.mlp.expert_bias", "laguna": "model.layers.1.mlp.experts.e_score_correction_bias"}


@pytest.mark.parametrize("name", FROZEN)
def test_checkpoint_counts_frozen_correction_bias(name, tmp_path):
    model_type, k, config, layers, E = FROZEN[name]
    meta_model(model_type, config)  # skips where transformers lacks the model type
    model = tiny_checkpoint(model_type, config, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert STORED_AS[model_type] in f.keys()
    c, disk = count_config(dict(config, model_type=model_type)), count_checkpoint(tmp_path)
    assert (disk.total_params, disk.buffers) == (sum(p.numel() for p in model.parameters()), {})
    assert (disk.total, disk.active) == (c.total, c.active)
    assert disk.total["router"] == layers * (E * config["hidden_size"] + E)
    assert "config.json formula agrees exactly" in disk.notes


def test_checkpoint_keeps_deepseek_correction_bias_a_buffer(tmp_path):
    """DeepSeek-V3 registers gate.e_score_correction_bias as a persistent buffer: on disk under the same kind of
    name as Laguna's parameter, still a buffer."""
    model = tiny_checkpoint("deepseek_v3", HF_CASES["deepseek_v3"], tmp_path)
    disk = count_checkpoint(tmp_path)
    layers, E, H = 2, 4, 16  # first_k_dense_replace=1 of 3 layers
    assert disk.total_params == sum(p.numel() for p in model.parameters())
    assert disk.buffers == {"e_score_correction_bias": layers * E} == {
        n: v for n, v in persistent_buffers(model).items() if n in ROUTER_STATE}
    assert disk.total["router"] == layers * E * H


@pytest.mark.parametrize("model_type", ["ernie4_5_moe", "afmoe", "laguna"])
def test_frozen_correction_bias_default_configs(model_type):
    """The full-size default configs, built on the meta device."""
    ref = Reference(model_type, k=1)
    c = count_config(ref.config.to_dict())
    assert c.total_params == sum(p.numel() for p in ref.model.parameters()) and c.buffers == {}


def test_released_ernie_counts_its_correction_bias():
    c = count_config(moe.ERNIE45_21B)  # layers 1..27 routed over 64 experts
    assert c.total["router"] == c.active["router"] == 27 * (64 * 2560 + 64) and c.buffers == {}


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-moe-shared"])
def test_moekit_router_buffer_is_reported(preset):
    """moekit's own model: moe/router.py Router registers e_score_correction_bias [E], a persistent buffer."""
    cfg = MoEConfig.from_name(preset)
    with torch.device("meta"):
        model = MoEForCausalLM(cfg)
    c = count_config(cfg)
    routed = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert c.total_params == sum(p.numel() for p in model.parameters())
    assert c.buffers == persistent_buffers(model) == {"e_score_correction_bias": routed * cfg.num_local_experts}
    assert c.buffers == count_module(model).buffers


def test_conventions_explain_buffers_only_where_there_are_some():
    from moekit.moe.accounting.report import conventions

    buffered = count_config(MoEConfig.from_name("tiny-moe"))
    n = buffered.buffers["e_score_correction_bias"]
    line = next(s for s in conventions(buffered) if s.startswith("buffers"))
    assert f"e_score_correction_bias {n:,}" in line and "registers as a buffer" in line and "under router" in line
    frozen = count_config(moe.ERNIE45_21B)
    assert frozen.buffers == {} and not any("buffer" in s for s in conventions(frozen))
