"""moe.formats: the Mixtral and Qwen2-MoE checkpoint layouts, their names and configs, bad checkpoints."""

import json
import warnings

import pytest
import torch
import transformers

from moekit.llama.checkpoint import CheckpointReader, save_state_dict
from moekit.llama.errors import CheckpointError, ConfigError
from moekit.llama.io import AtomicDir, write_json
from moekit.moe import MoEConfig, MoEForCausalLM
from moekit.moe import formats as fm


def cfg(**kw):
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_local_experts=3, num_experts_per_tok=2)
    return MoEConfig(**{**base, **kw})


def test_choose_format():
    assert fm.choose_format(cfg()) == "mixtral"
    assert fm.choose_format(cfg(mlp_only_layers=[0])) == "qwen2_moe"
    assert fm.choose_format(cfg(num_shared_experts=1, shared_expert_gate=True)) == "qwen2_moe"
    assert fm.choose_format(cfg(norm_topk_prob=False)) == "qwen2_moe"
    assert fm.choose_format(cfg(), "qwen2_moe") == "qwen2_moe"  # qwen2_moe can express a Mixtral
    with pytest.raises(ConfigError, match="format 'mixtral' cannot express .*shared expert.*use format 'qwen2_moe'"):
        fm.choose_format(cfg(num_shared_experts=1, shared_expert_gate=True), "mixtral")
    with pytest.raises(ConfigError, match="neither HF format .*capacity_factor"):
        fm.choose_format(cfg(capacity_factor=1.0))
    with pytest.raises(ConfigError, match="neither HF format .*without shared_expert_gate"):
        fm.choose_format(cfg(num_shared_experts=1, mlp_only_layers=[1]), "qwen2_moe")
    with pytest.raises(ConfigError, match="unknown checkpoint format 'deepseek'"):
        fm.choose_format(cfg(), "deepseek")


def test_names_are_what_to_disk_writes():
    for fmt, config in (("mixtral", cfg()), ("qwen2_moe", cfg(num_shared_experts=1, shared_expert_gate=True,
                                                                 mlp_only_layers=[0]))):
        model = MoEForCausalLM(config)
        written = {n for n, _ in model.checkpoint_tensors(fmt)}
        for i in range(config.num_hidden_layers):
            if config.is_moe_layer(i):
                names = {fm.router_name(fmt, i)} | {n for e in range(3) for n in fm.expert_names(fmt, i, e).values()}
                if config.has_shared_expert:
                    names |= set(fm.shared_expert_names(fmt, i).values())
            else:
                names = set(fm.dense_mlp_names(i).values())
            assert names <= written, names - written
        assert len({n for n in written if "experts." in n}) == 3 * 3 * len(config.moe_layers)
    with pytest.raises(ConfigError, match="no shared expert"):
        fm.shared_expert_names("mixtral", 0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # transformers' empty shared expert
def test_qwen2_moe_without_shared_expert_round_trips_through_transformers(tmp_path):
    model = MoEForCausalLM(cfg(mlp_only_layers=[1])).eval()
    model.save_pretrained(tmp_path / "q")
    reader = CheckpointReader(tmp_path / "q")
    assert reader.shape("model.layers.0.mlp.shared_expert.gate_proj.weight") == (0, 16)  # as transformers writes
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "q", attn_implementation="eager").eval()
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max() <= 1e-5
        assert torch.equal(MoEForCausalLM.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)


def test_reads_fused_transformers5_names(tmp_path):
    model = MoEForCausalLM(cfg()).eval()
    d = fm.hf_config_dict(model.config, "mixtral")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("correction_bias")}
    with AtomicDir(tmp_path / "fused") as tmp:  # in-memory names on disk: mlp.experts.gate_up_proj etc.
        write_json(f"{tmp}/config.json", d)
        save_state_dict(tmp, state)
    back = MoEForCausalLM.from_pretrained(tmp_path / "fused")
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_router_bias_written_only_when_nonzero(tmp_path):
    model = MoEForCausalLM(cfg(router_bias_update_rate=0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "zero")
    assert not any("correction_bias" in n for n in CheckpointReader(tmp_path / "zero").names())
    model.model.layers[1].mlp.gate.e_score_correction_bias[:] = torch.tensor([0.1, -0.2, 0.1])
    with pytest.warns(UserWarning, match="format 'mixtral' cannot hold it"):
        model.save_pretrained(tmp_path / "bias")
    back = MoEForCausalLM.from_pretrained(tmp_path / "bias")
    assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias, torch.tensor([0.1, -0.2, 0.1]))
    assert back.model.layers[0].mlp.gate.e_score_correction_bias.abs().max() == 0
    with open(tmp_path / "bias" / "config.json") as f:
        assert json.load(f)["router_bias_update_rate"] == 0.01


def test_bad_checkpoints(tmp_path):
    model = MoEForCausalLM(cfg())
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="already exists"):
        model.save_pretrained(tmp_path / "ok")
    with pytest.raises(ConfigError, match="use format 'qwen2_moe'"):
        MoEForCausalLM(cfg(mlp_only_layers=[0])).save_pretrained(tmp_path / "x", format="mixtral")
    state = dict(model.checkpoint_tensors("mixtral"))
    d = fm.hf_config_dict(model.config, "mixtral")
    extra = {**state, "model.layers.0.block_sparse_moe.experts.3.w1.weight": torch.zeros(24, 16)}
    with AtomicDir(tmp_path / "extra") as tmp:
        write_json(f"{tmp}/config.json", d)
        save_state_dict(tmp, extra)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.block_sparse_moe.experts.3.w1"):
        MoEForCausalLM.from_pretrained(tmp_path / "extra")
    state["model.layers.1.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(16, 23)
    with AtomicDir(tmp_path / "shape") as tmp:
        write_json(f"{tmp}/config.json", d)
        save_state_dict(tmp, state)
    with pytest.raises(CheckpointError, match=r"experts.2.w2.weight' has shape \[16, 23\], expected \[16, 24\]"):
        MoEForCausalLM.from_pretrained(tmp_path / "shape")
