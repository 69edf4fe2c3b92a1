"""moe.accounting: config formula, checkpoint headers and live module agree exactly on the same tiny models;
headers only and fast; the upcycling arithmetic through `moekit params`."""

import json
import os
import struct
import time

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_moe_accounting_formulas import MIXTRAL_8X7B
from torch import nn

from moekit.cli import main
from moekit.llama import Llama, LlamaConfig, checkpoint
from moekit.moe.accounting import classify, count_checkpoint, count_config, count_module, count_params
from moekit.moe.config import MoEConfig
from moekit.moe.model import MoEForCausalLM

from helpers import moekit, moekit_json, one_line_error

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def same(*counts):
    first = counts[0]
    for c in counts[1:]:
        assert (c.total, c.active) == (first.total, first.active), (first.source, c.source)


def hf_model(model_type: str, **kw):
    """A tiny random transformers model of `model_type` with its config dict (as config.json would hold it)."""
    cls = transformers.AutoConfig.for_model(model_type, **kw)
    return transformers.AutoModelForCausalLM.from_config(cls), cls.to_dict()


HF_CASES = {
    "llama": dict(TINY, intermediate_size=24, attention_bias=True, mlp_bias=True),
    "llama-tied": dict(TINY, intermediate_size=24, tie_word_embeddings=True),
    "mistral": dict(TINY, intermediate_size=24, head_dim=8),
    "mixtral": dict(TINY, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(TINY, intermediate_size=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=12, mlp_only_layers=[0], tie_word_embeddings=True),
    "qwen2_moe-step2": dict(TINY, num_hidden_layers=4, intermediate_size=24, num_experts=4, num_experts_per_tok=1,
                            moe_intermediate_size=8, shared_expert_intermediate_size=12, decoder_sparse_step=2),
    "qwen3_moe": dict(TINY, intermediate_size=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      head_dim=8, mlp_only_layers=[1]),
    "olmoe": dict(TINY, intermediate_size=24, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(TINY, intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
                        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6),
    "deepseek_v3": dict(TINY, intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=8,
                        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, n_group=1, topk_group=1),
    "dbrx": dict(vocab_size=64, d_model=16, n_heads=4, n_layers=2, attn_config=dict(kv_n_heads=2, rope_theta=1e4),
                 ffn_config=dict(ffn_hidden_size=8, moe_num_experts=4, moe_top_k=2)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_models_three_ways(case, tmp_path):
    model, cfg = hf_model(case.split("-")[0], **HF_CASES[case])
    formula = count_config(cfg)
    module = count_module(model)
    assert module.total_params == sum(p.numel() for p in model.parameters()) == formula.total_params
    model.save_pretrained(tmp_path)
    disk = count_checkpoint(tmp_path)
    same(formula, module, disk)
    assert "config.json formula agrees exactly" in disk.notes
    if formula.arch.num_experts:
        E, k = formula.arch.num_experts, formula.arch.num_experts_per_tok
        assert formula.active["routed_experts"] * E == formula.total["routed_experts"] * k
        assert formula.total["routed_experts"] > 0 and formula.total["router"] > 0


def test_tied_checkpoint_keeps_lm_head_bias(tmp_path):
    """ERNIE 4.5 with use_bias ties lm_head.weight to the embedding but keeps lm_head.bias [V] its own; the
    checkpoint stores both tensors and only the weight counts once."""
    model, cfg = hf_model("ernie4_5_moe", **TINY, intermediate_size=24, moe_intermediate_size=8, moe_num_experts=4,
                          moe_k=2, moe_layer_start_index=1, use_bias=True)
    model.save_pretrained(tmp_path)
    assert cfg["tie_word_embeddings"] and model.lm_head.weight is model.model.embed_tokens.weight
    disk = count_checkpoint(tmp_path)
    attention, dense, shared = 2 * (16 * 16 + 16) + 2 * (16 * 8 + 8), 3 * 16 * 24 + 2 * 24 + 16, 3 * 16 * 16 + 3 * 16
    by_hand = (64 * 16 + 64 + 16 + 3 * 2 * 16 + 3 * attention + dense  # embedding, head bias, norms, layer 0
               + 2 * (4 * 16 + 4 + 4 * 3 * 16 * 8 + shared))  # layers 1, 2: gate, correction bias, experts, shared
    assert disk.total_params == sum(p.numel() for p in model.parameters()) == by_hand == 9_704
    assert disk.total["lm_head"] == disk.active["lm_head"] == 64  # lm_head.bias [V]
    assert disk.total["embedding"] == 64 * 16 and disk.tied and disk.buffers == {}
    same(count_config(cfg), count_module(model), disk)
    assert "config.json formula agrees exactly" in disk.notes


def test_qwen2_moe_components_by_hand():
    model, cfg = hf_model("qwen2_moe", **HF_CASES["qwen2_moe"])
    c = count_module(model)
    H, E = 16, 4
    assert c.total["dense_ffn"] == 3 * H * 24  # layer 0 is in mlp_only_layers
    assert c.total["routed_experts"] == 2 * E * 3 * H * 8 and c.active["routed_experts"] == 2 * 2 * 3 * H * 8
    assert c.total["shared_experts"] == c.active["shared_experts"] == 2 * (3 * H * 12 + H)  # + sigmoid gate
    assert c.total["router"] == 2 * E * H and c.total["lm_head"] == 0 and c.tied


def test_llama_three_ways(tmp_path):
    for tied in (False, True):
        model = Llama(LlamaConfig.from_name("tiny", tie_word_embeddings=tied))
        model.save_pretrained(tmp_path / f"tied{tied}")
        a, b = count_config(model.config), count_module(model)
        c = count_checkpoint(tmp_path / f"tied{tied}")
        same(a, b, c)
        assert b.total_params == model.num_parameters() and b.tied == tied
        assert b.total["lm_head"] == (0 if tied else 256 * 64)


@pytest.mark.parametrize("preset,fmt", [("tiny-moe", "mixtral"), ("tiny-moe-shared", "qwen2_moe"),
                                        ("tiny-moe-8x2", "auto")])
def test_moekit_model_three_ways(preset, fmt, tmp_path):
    model = MoEForCausalLM(MoEConfig.from_name(preset))
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    a, b, c = count_params(preset), count_module(model), count_checkpoint(tmp_path / "ckpt")
    same(a, b, c)  # the router's e_score_correction_bias buffer is on disk but is no parameter
    assert b.total_params == model.num_parameters()
    assert b.active["routed_experts"] * model.config.num_local_experts == \
        b.total["routed_experts"] * model.config.num_experts_per_tok


def test_module_duck_typing():
    """Stacked expert tensors are found by their leading dim E, whatever their name; k from the config or a
    `top_k` attribute."""

    class Bank(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.zeros(4, 8, 16))  # [E, F, H]
            self.w_out = nn.Parameter(torch.zeros(4, 16, 8))  # [E, H, F]
            self.top_k = 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16, bias=False)
            self.bank = Bank()

    c = count_module(Net(), config={"num_local_experts": 4})
    assert c.total == {**c.total, "routed_experts": 1024, "other": 256}
    assert c.active["routed_experts"] == 256  # top_k = 1 from the module attribute
    assert count_module(Net(), config={"num_local_experts": 4, "num_experts_per_tok": 2}).active[
        "routed_experts"] == 512


def test_sixty_shards_headers_only_and_fast(tmp_path, capsys, monkeypatch):
    """60 shards, one layer each (Mixtral names, 8 experts): counted from headers alone, well under a second."""
    L, H, F, E, V = 60, 8, 16, 8, 32
    cfg = dict(model_type="mixtral", vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
               num_attention_heads=2, num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weight_map = {}
    for i in range(L):
        p, t = f"model.layers.{i}", {}
        for n, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (4, H)), ("self_attn.v_proj", (4, H)),
                         ("self_attn.o_proj", (H, H)), ("input_layernorm", (H,)), ("post_attention_layernorm", (H,)),
                         ("block_sparse_moe.gate", (E, H))]:
            t[f"{p}.{n}.weight"] = torch.zeros(shape)
        for j in range(E):
            for w, shape in (("w1", (F, H)), ("w2", (H, F)), ("w3", (F, H))):
                t[f"{p}.block_sparse_moe.experts.{j}.{w}.weight"] = torch.zeros(shape)
        if i == 0:
            t["model.embed_tokens.weight"] = torch.zeros(V, H)
        if i == L - 1:
            t.update({"model.norm.weight": torch.zeros(H), "lm_head.weight": torch.zeros(V, H)})
        file = f"model-{i + 1:05d}-of-{L:05d}.safetensors"
        save_file(t, str(tmp_path / file))
        weight_map.update(dict.fromkeys(t, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def no_data(*a, **k):
        raise AssertionError("tensor data was opened")

    monkeypatch.setattr(checkpoint.CheckpointReader, "get", no_data)
    start = time.perf_counter()
    assert main(["params", str(tmp_path), "--json"]) == 0
    elapsed = time.perf_counter() - start
    out = json.loads(capsys.readouterr().out)
    formula = count_config(cfg)
    assert (out["total_params"], out["active_params"]) == (formula.total_params, formula.active_params)
    print(f"\n60 shards, {len(weight_map):,} tensors: `moekit params DIR --json` in {elapsed * 1000:.0f} ms")


def _upcycle_with_transformers(dense_dir, dst, E=8, k=2):
    """A real upcycled checkpoint built independently of moekit: transformers' Mixtral whose E experts are
    copies of each dense FFN, with a fresh router (the `copy` recipe)."""
    dense = Llama.from_pretrained(dense_dir)
    d = dense.config.to_dict()
    cfg = transformers.MixtralConfig(**{k_: d[k_] for k_ in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_hidden_layers", "num_attention_heads",
                                                             "num_key_value_heads", "rms_norm_eps")},
                                     num_local_experts=E, num_experts_per_tok=k)
    moe = transformers.MixtralForCausalLM(cfg)
    state = moe.state_dict()
    for name, t in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = t
    for i, layer in enumerate(dense.model.layers):
        m = layer.mlp
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([m.gate_proj.weight, m.up_proj.weight]
                                                                         ).expand(E, -1, -1).clone()
        state[f"model.layers.{i}.mlp.experts.down_proj"] = m.down_proj.weight.expand(E, -1, -1).clone()
    moe.load_state_dict(state)
    moe.save_pretrained(dst)


def _upcycle_with_moekit(dense_dir, dst):
    assert main(["upcycle", str(dense_dir), str(dst), "--num-experts", "8", "--top-k", "2", "--recipe", "copy",
                 "--no-progress"]) == 0


@pytest.mark.parametrize("upcycle", [_upcycle_with_moekit, _upcycle_with_transformers], ids=["moekit", "transformers"])
def test_upcycling_multiplies_ffn_params(upcycle, tmp_path, capsys):
    """`copy` to 8 experts top-2: FFN parameters x8 in total, x2 active; everything else unchanged, plus routers."""
    dense_model = Llama(LlamaConfig.from_name("tiny"))
    dense_model.save_pretrained(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe")
    with checkpoint.CheckpointReader(tmp_path / "moe") as r:  # the experts really are copies
        w1 = r.get("model.layers.1.block_sparse_moe.experts.5.w1.weight")
    assert torch.equal(w1, dense_model.model.layers[1].mlp.gate_proj.weight)
    capsys.readouterr()

    dense = moekit_json(capsys, "params", tmp_path / "dense")
    moe = moekit_json(capsys, "params", tmp_path / "moe")
    ffn = dense["components"]["dense_ffn"]
    assert moe["components"]["routed_experts"] == {"total": 8 * ffn["total"], "active": 2 * ffn["active"]}
    assert moe["components"]["dense_ffn"] == {"total": 0, "active": 0}
    for comp in ("embedding", "attention", "norm", "lm_head"):
        assert moe["components"][comp] == dense["components"][comp]
    router = 2 * 8 * 64  # layers x E x H
    assert moe["components"]["router"]["total"] == router
    assert moe["total_params"] == dense["total_params"] + 7 * ffn["total"] + router
    assert moe["active_params"] == dense["active_params"] + ffn["total"] + router
    assert "config.json formula agrees exactly" in moe["notes"]




def test_mixtral_8x7b_through_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    out = moekit_json(capsys, "params", tmp_path / "config.json")
    assert (out["total_params"], out["active_params"]) == (46_702_792_704, 12_879_925_248)
    assert out["components"]["router"] == {"total": 32 * 8 * 4096, "active": 32 * 8 * 4096}
    rc, text, _ = moekit(capsys, "params", tmp_path / "config.json")
    assert "46,702,792,704 parameters (46.7B), 12,879,925,248 active per token (12.9B)" in text


def test_classify_names():
    cases = {
        "model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head", "transformer.wte.weight": "embedding",
        "model.layers.3.self_attn.q_proj.weight": "attention", "model.layers.3.self_attn.q_proj.bias": "attention",
        "model.layers.3.self_attn.q_a_layernorm.weight": "norm", "model.layers.3.self_attn.q_norm.weight": "norm",
        "model.layers.3.mlp.gate_proj.weight": "dense_ffn", "model.layers.3.block_sparse_moe.gate.weight": "router",
        "model.layers.3.block_sparse_moe.experts.7.w2.weight": "routed_experts",
        "model.layers.3.mlp.experts.gate_up_proj": "routed_experts", "model.layers.3.mlp.gate.weight": "router",
        "model.layers.3.mlp.shared_expert.up_proj.weight": "shared_experts",
        "model.layers.3.mlp.shared_expert_gate.weight": "shared_experts",
        "model.layers.3.mlp.shared_experts.down_proj.weight": "shared_experts",
        "model.layers.3.mlp.gate.e_score_correction_bias": None, "model.layers.0.self_attn.rotary_emb.inv_freq": None,
        "transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight": "attention",
        "transformer.blocks.0.norm_attn_norm.norm_1.weight": "norm", "transformer.blocks.0.ffn.router.layer.weight":
        "router", "transformer.blocks.0.ffn.experts.mlp.w1": "routed_experts", "model.norm.weight": "norm",
    }
    assert {n: classify(n) for n in cases} == cases


def test_error_directory_without_config_or_weights(tmp_path, capsys):
    assert "no config.json" in one_line_error(capsys, "params", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    err = one_line_error(capsys, "params", tmp_path)
    assert "no *.safetensors weight files" in err and "config.json" in err


def test_error_missing_required_field(tmp_path, capsys):
    cfg = dict(MIXTRAL_8X7B)
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(capsys, "params", tmp_path / "config.json")
    assert "required field 'hidden_size' is missing" in err and "config.json" in err
    cfg = dict(MIXTRAL_8X7B, num_local_experts="8")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "'num_local_experts' must be a positive integer" in one_line_error(capsys, "params", tmp_path / "config.json")


def test_error_corrupt_safetensors_header(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.from_name("tiny").to_dict()))
    blob = b"{not json at all"
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    err = one_line_error(capsys, "params", tmp_path)
    assert "model.safetensors" in err and "corrupt" in err
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    assert "truncated" in one_line_error(capsys, "params", tmp_path)


def test_error_unknown_model_type_and_target(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(MIXTRAL_8X7B, model_type="gpt2")))
    err = one_line_error(capsys, "params", tmp_path / "config.json")
    assert "model_type 'gpt2' is not supported" in err
    for mt in ("llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe",
               "dbrx", "moe"):
        assert mt in err
    err = one_line_error(capsys, "params", "no-such-model")
    assert "is not a checkpoint directory, config.json, preset or parameter count" in err and "llama2-7b" in err
    assert "no such file" in one_line_error(capsys, "params", os.path.join(tmp_path, "missing", "config.json"))
    (tmp_path / "bad.json").write_text("{")
    assert "not valid JSON" in one_line_error(capsys, "params", tmp_path / "bad.json")
    assert "mfu must be in (0, 1]" in one_line_error(capsys, "params", "7B", "--mfu", "1.5")




@pytest.mark.parametrize("config, words", [
    ({"model_type": ["llama"]}, "field 'model_type' must be a string"),
    ({**MIXTRAL_8X7B, "num_hidden_layers": 10**12}, "is 1,000,000,000,000; moekit counts models of at most 100,000"),
    ({"model_type": "dbrx", "vocab_size": 100, "d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_config": [1, 2]},
     "ffn_config: expected a JSON object, got list"),
    ({**MIXTRAL_8X7B, "hidden_size": 1e400}, "field 'hidden_size' must be a positive integer, got inf"),
    ({"model_type": "llava", "text_config": {"model_type": {"a": 1}}}, "model_type 'llava' is not supported"),
])
def test_hostile_configs_are_one_line_and_quick(tmp_path, capsys, config, words):
    (tmp_path / "config.json").write_text(json.dumps(config).replace("Infinity", "1e400"))
    err = one_line_error(capsys, "params", tmp_path / "config.json")
    assert words in err, err
