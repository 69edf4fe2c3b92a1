"""upcycle.convert / upcycle.verify end to end: function preservation in moekit and transformers, the recipes'
defining properties on disk, upcycling.json, the library API and the CLI."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from moekit.cli import main
from moekit.llama import Llama, LlamaConfig
from moekit.moe.model import MoEForCausalLM
from moekit.upcycle import UpcycleOptions, read_record, upcycle, upcycle_model, verify_checkpoints
from moekit.upcycle.verify import VerifyError


def tiny_config(**kw):
    # initializer_range 0.1: the FFN moves the logits by O(0.1), so 1e-5 agreement is a real check
    return LlamaConfig(**{**dict(vocab_size=101, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.1), **kw})


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "dense"
    Llama(tiny_config()).save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer.json").write_text('{"model": "tiny"}')
    (path / "generation_config.json").write_text('{"max_new_tokens": 5}')
    (path / "original").mkdir()
    (path / "original" / "params.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def dense(dense_dir):
    return Llama.from_pretrained(dense_dir)


@pytest.fixture(scope="module")
def hf_dense(dense_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(dense_dir).eval()


IDS = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS) if not isinstance(model, Llama) else model(IDS)
    return out.logits


def read_tensors(path, names=None):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as s:
                out.update({n: s.get_tensor(n) for n in s.keys() if names is None or n in names})
    return out


EXACT = {  # options -> the transformers class the output loads as
    "copy": (dict(), "MixtralForCausalLM"),
    "copy-every-other": (dict(moe_layers="every-other"), "Qwen2MoeForCausalLM"),
    "copy-shared": (dict(shared_experts=1), "Qwen2MoeForCausalLM"),
    "granular": (dict(recipe="granular", granularity=4), "MixtralForCausalLM"),
    "granular-shared-partial": (dict(recipe="granular", granularity=3, shared_experts=1, moe_layers="0,2"),
                                "Qwen2MoeForCausalLM"),
    "copy-zeros-router": (dict(router_init="zeros", top_k=3), "MixtralForCausalLM"),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # transformers' empty shared expert
@pytest.mark.parametrize("case", list(EXACT))
def test_function_preserving_recipes_in_moekit_and_transformers(tmp_path, dense_dir, dense, hf_dense, case):
    import transformers

    kw, hf_class = EXACT[case]
    record = upcycle(dense_dir, tmp_path / "moe", UpcycleOptions(num_experts=4, **kw), progress=False, log=None)
    assert record["function_preserving"] and record["verify"]["ok"] and record["verify"]["max_abs"] <= 1e-5
    ref = logits(dense)
    assert (logits(hf_dense) - ref).abs().max() <= 1e-5
    ours = MoEForCausalLM.from_pretrained(tmp_path / "moe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(hf).__name__ == hf_class
    assert (logits(ours) - ref).abs().max() <= 1e-5
    assert (logits(hf) - ref).abs().max() <= 1e-5
    assert (logits(hf) - logits(ours)).abs().max() <= 1e-5
    cfg = ours.config
    G = kw.get("granularity", kw.get("shared_experts", 0) + 1)
    R = G - kw.get("shared_experts", 0)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (4 * R, kw.get("top_k", 2) * R)
    assert cfg.moe_intermediate_size == 96 // G and record["moe_layers"] == cfg.moe_layers
    if case == "granular":  # the defining numbers: shard g of the dense FFN, down x R, router rows shared per group
        t = read_tensors(tmp_path / "moe")
        dense_t = read_tensors(dense_dir)
        d = "model.layers.1.mlp.{}_proj.weight"
        e = "model.layers.1.block_sparse_moe.experts.{}.{}.weight"
        for j in range(16):
            g = j % 4
            assert torch.equal(t[e.format(j, "w1")], dense_t[d.format("gate")][g * 24:(g + 1) * 24])
            assert torch.equal(t[e.format(j, "w2")], dense_t[d.format("down")][:, g * 24:(g + 1) * 24] * 4)
        router = t["model.layers.1.block_sparse_moe.gate.weight"].view(4, 4, 32)
        assert torch.equal(router, router[:, :1].expand(4, 4, 32))
    if "shared" in case:  # shared expert = first shard(s), down x 2 against sigmoid(0) = 1/2
        t = read_tensors(tmp_path / "moe")
        dense_t = read_tensors(dense_dir)
        S = cfg.shared_expert_intermediate_size
        assert torch.equal(t["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros(1, 32))
        assert torch.equal(t["model.layers.0.mlp.shared_expert.down_proj.weight"],
                           dense_t["model.layers.0.mlp.down_proj.weight"][:, :S] * 2)


@pytest.mark.parametrize("scaling", ["none", "cube-root"])
def test_granular_without_exact_scaling_is_reported_not_exact(tmp_path, dense_dir, dense, scaling):
    record = upcycle(dense_dir, tmp_path / "moe", UpcycleOptions(num_experts=2, recipe="granular", granularity=2,
                     weight_scaling=scaling), progress=False, log=None)
    assert not record["function_preserving"] and not record["verify"]["ok"]
    assert (logits(MoEForCausalLM.from_pretrained(tmp_path / "moe")) - logits(dense)).abs().max() > 1e-3


def test_drop_and_noise_defining_properties_on_disk(tmp_path, dense_dir):
    dense_t = read_tensors(dense_dir)
    upcycle(dense_dir, tmp_path / "drop", UpcycleOptions(num_experts=4, recipe="drop", drop_ratio=0.25, seed=3),
            progress=False, log=None)
    t = read_tensors(tmp_path / "drop")
    assert not read_record(tmp_path / "drop")["function_preserving"]
    sets, fresh = [], {"gate": [], "up": [], "down": []}
    for j in range(4):
        e = f"model.layers.2.block_sparse_moe.experts.{j}.{{}}.weight"
        changed = []
        for role, name, dim in (("gate", "w1", 0), ("up", "w3", 0), ("down", "w2", 1)):
            w, d = t[e.format(name)], dense_t[f"model.layers.2.mlp.{role}_proj.weight"]
            rows = (w != d).any(dim=1 - dim).nonzero().flatten()
            changed.append(rows)
            fresh[role].append(w.index_select(dim, rows).flatten())
        assert torch.equal(changed[0], changed[1]) and torch.equal(changed[0], changed[2])
        assert changed[0].numel() == 24  # round(0.25 * 96)
        sets.append(set(changed[0].tolist()))
    assert len({frozenset(s) for s in sets}) == 4  # each expert its own neurons
    for role, values in fresh.items():  # redrawn from N(mean, std^2) of the matrix replaced
        v, d = torch.cat(values), dense_t[f"model.layers.2.mlp.{role}_proj.weight"]
        assert v.std().item() == pytest.approx(d.std().item(), rel=0.05)
        assert abs(v.mean().item() - d.mean().item()) < 4 * d.std().item() / v.numel() ** 0.5

    upcycle(dense_dir, tmp_path / "noise", UpcycleOptions(num_experts=4, recipe="noise", noise_scale=0.02),
            progress=False, log=None)
    t = read_tensors(tmp_path / "noise")
    d = dense_t["model.layers.0.mlp.up_proj.weight"]
    eps = torch.stack([t[f"model.layers.0.block_sparse_moe.experts.{j}.w3.weight"] - d for j in range(4)])
    assert eps.std().item() / d.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(not torch.equal(eps[0], eps[j]) for j in range(1, 4))


def test_record_side_files_seed_reproducibility_and_library_api(tmp_path, dense_dir, dense):
    o = UpcycleOptions(num_experts=4, recipe="drop", seed=7)
    upcycle(dense_dir, tmp_path / "a", o, progress=False, log=None)
    rec = read_record(tmp_path / "a")
    sha = hashlib.sha256((dense_dir / "config.json").read_bytes()).hexdigest()
    assert (rec["source"], rec["source_config_sha256"], rec["recipe"], rec["seed"]) == (str(dense_dir), sha, "drop", 7)
    assert rec["options"]["drop_ratio"] == 0.5 and rec["options"]["num_experts"] == 4
    assert sorted(os.listdir(tmp_path / "a")) == [".moekit", "config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "upcycling.json"]
    assert rec["copied_files"] == ["generation_config.json", "tokenizer.json"] and "original" in rec["not_copied"]
    assert json.loads((tmp_path / "a/config.json").read_text())["model_type"] == "mixtral"
    upcycle(dense_dir, tmp_path / "b", o, progress=False, log=None, )
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed: same bits
    upcycle(dense_dir, tmp_path / "c", UpcycleOptions(num_experts=4, recipe="drop", seed=8), progress=False, log=None)
    c = read_tensors(tmp_path / "c")
    assert not torch.equal(a["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
                           c["model.layers.0.block_sparse_moe.experts.0.w1.weight"])
    # the library API makes the same tensors in memory
    live = upcycle_model(dense, o)
    assert isinstance(live, MoEForCausalLM)
    disk = MoEForCausalLM.from_pretrained(tmp_path / "a")
    for (n, p), (n2, q) in zip(live.state_dict().items(), disk.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n
    exact = upcycle_model(dense, UpcycleOptions(num_experts=4, shared_experts=1))
    assert (logits(exact) - logits(dense)).abs().max() <= 1e-5
    exact.model.embed_tokens.weight.data.zero_()  # its own tensors: the dense model is untouched
    assert dense.model.embed_tokens.weight.abs().sum() > 0


def test_bf16_output_verifies_against_the_rounded_dense_model(tmp_path, dense_dir):
    rec = upcycle(dense_dir, tmp_path / "bf16", UpcycleOptions(num_experts=4, dtype="bf16", shared_experts=1),
                  progress=False, log=None)
    assert rec["verify"]["ok"] and rec["verify"]["max_abs"] <= 1e-5
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(tmp_path / "bf16").values())
    assert not verify_checkpoints(dense_dir, tmp_path / "bf16", atol=1e-5).ok  # against the fp32 weights


def test_cli_upcycle_and_verify(tmp_path, dense_dir, capsys):
    dst = tmp_path / "moe"
    assert main(["upcycle", str(dense_dir), str(dst), "--num-experts", "4", "--top-k", "1", "--no-progress",
                 "--max-shard-size", "30KB"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"upcycled {dense_dir} -> {dst}: recipe copy, 4 experts of 96, top-1")
    assert "verify: max |dlogit|" in out[0] and len(list(dst.glob("model-*.safetensors"))) > 3
    assert main(["verify", str(dense_dir), str(dst), "--no-progress", "--atol", "1e-5"]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    noisy = tmp_path / "noisy"
    assert main(["upcycle", str(dense_dir), str(noisy), "--recipe", "noise", "--noise-scale", "0.1", "--no-progress",
                 "--num-experts", "2"]) == 0
    assert "not function-preserving by design" in capsys.readouterr().out
    assert main(["verify", str(dense_dir), str(noisy), "--no-progress", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert not result["ok"] and result["max_abs"] > 1e-4 and result["tokens"] == 32


def test_a_failed_exactness_check_publishes_nothing(tmp_path, dense_dir, monkeypatch):
    from moekit.upcycle import recipes

    monkeypatch.setattr(recipes, "SHARED_GATE_COMPENSATION", 1.0)  # forget sigmoid(0) = 1/2
    with pytest.raises(VerifyError, match="should reproduce the dense model but max"):
        upcycle(dense_dir, tmp_path / "moe", UpcycleOptions(num_experts=2, shared_experts=1), progress=False, log=None)
    assert os.listdir(tmp_path) == []


def test_tied_embeddings_stay_tied(tmp_path):
    import transformers

    torch.manual_seed(2)
    dense = Llama(tiny_config(tie_word_embeddings=True, num_hidden_layers=2)).eval()
    dense.save_pretrained(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleOptions(num_experts=2), progress=False, log=None)
    assert "lm_head.weight" not in read_tensors(tmp_path / "moe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert hf.config.tie_word_embeddings and (logits(hf) - logits(dense)).abs().max() <= 1e-5
