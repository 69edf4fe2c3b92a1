"""llama.checkpoint: the safetensors reader and writer; interop with transformers both ways; bad checkpoints."""

import json
import os

import pytest
import torch

from moekit.llama import CheckpointError, ConfigError, Llama, LlamaConfig
from moekit.llama.checkpoint import INDEX_NAME, CheckpointReader
from moekit.llama.io import MARKER

from helpers import hf_llama


def tiny(**kw):
    return LlamaConfig(**{**dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), **kw})


@pytest.fixture
def ids():
    return torch.randint(0, 101, (2, 13))


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_sharded_checkpoint_loads_with_identical_logits(tmp_path, ids, tied):
    hf = hf_llama(Llama(tiny(tie_word_embeddings=tied)))
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / INDEX_NAME).exists() and len(list(tmp_path.glob("*.safetensors"))) > 3
    ours = Llama.from_pretrained(tmp_path)
    assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_our_checkpoint_loads_in_transformers_with_identical_logits(tmp_path, ids, tied):
    import transformers

    ours = Llama(tiny(tie_word_embeddings=tied)).eval()
    ours.save_pretrained(tmp_path / "ck", max_shard_size="30KB")
    files = sorted(os.listdir(tmp_path / "ck"))
    assert INDEX_NAME in files and "config.json" in files and MARKER in files
    assert [f for f in files if f.endswith(".safetensors")][0] == f"model-00001-of-{len(files) - 3:05d}.safetensors"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= 1e-6
    back = Llama.from_pretrained(tmp_path / "ck")
    assert torch.equal(back(ids).logits, ours(ids).logits)


def test_single_file_and_dtype_conversion(tmp_path, ids):
    ours = Llama(tiny())
    ours.save_pretrained(tmp_path / "bf16", dtype="bf16")
    assert sorted(os.listdir(tmp_path / "bf16")) == [MARKER, "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    back = Llama.from_pretrained(tmp_path / "bf16")
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))
    as32 = Llama.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert as32.lm_head.weight.dtype == torch.float32


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    dst = tmp_path / "out"
    Llama(tiny()).save_pretrained(dst)
    before = (dst / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        Llama(tiny()).save_pretrained(dst)
    assert (dst / "model.safetensors").read_bytes() == before
    Llama(tiny()).save_pretrained(dst, force=True)
    assert (dst / "model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporaries left


def test_reader_is_lazy(tmp_path):
    Llama(tiny()).save_pretrained(tmp_path / "ck", max_shard_size="10KB")
    r = CheckpointReader(tmp_path / "ck")
    assert r.shape("model.embed_tokens.weight") == (101, 32) and r.dtype("lm_head.weight") == torch.float32
    assert r._open == {}  # headers only so far
    r.get("model.norm.weight")
    assert len(r._open) == 1




# ---- bad input: one clear line, nothing written ---------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    Llama(tiny()).save_pretrained(tmp_path / "ck", max_shard_size="30KB")
    return tmp_path / "ck"


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' listed in {INDEX_NAME} is missing"):
        Llama.from_pretrained(sharded)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Llama.from_pretrained(sharded)


def test_corrupt_header(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        Llama.from_pretrained(sharded)


def test_shape_disagrees_with_config(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[64, 32\], "
                                              r"expected \[96, 32\]"):
        Llama.from_pretrained(sharded)


def test_other_architecture(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        Llama.from_pretrained(sharded)


def test_missing_config_and_missing_dir(sharded, tmp_path):
    (sharded / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Llama.from_pretrained(sharded)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Llama.from_pretrained(tmp_path / "nope")


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(tiny().to_json())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="which moekit never loads: convert them"):
        Llama.from_pretrained(tmp_path)


def test_missing_tensor(tmp_path):
    from moekit.llama.checkpoint import save_state_dict

    model = Llama(tiny())
    state = dict(model.checkpoint_tensors())
    del state["model.layers.1.self_attn.k_proj.weight"]
    os.mkdir(tmp_path / "ck")
    (tmp_path / "ck/config.json").write_text(model.config.to_json())
    save_state_dict(str(tmp_path / "ck"), state)
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.self_attn.k_proj.weight' is missing"):
        Llama.from_pretrained(tmp_path / "ck")
