"""moe.train.weights: a model built on the meta device takes its values one tensor at a time, a preset's remade
module by module as the seeded model built whole, a checkpoint's read for this rank's experts only; the result
equals the model loaded whole."""

import pytest
import torch
from safetensors.torch import save_file

from moekit.llama.checkpoint import CheckpointReader
from moekit.llama.config import LlamaConfig
from moekit.llama.errors import CheckpointError
from moekit.llama.model import Llama
from moekit.moe.expert_parallel import ExpertGroup
from moekit.moe.experts import SwiGLUExperts
from moekit.moe.train.parallel import is_routed_expert
from moekit.moe.train.source import load_model
from moekit.moe.train.weights import CheckpointWeights, SeededWeights, materialize

pytestmark = pytest.mark.usefixtures("one_thread")


def state(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


@pytest.mark.parametrize("preset", ["tiny", "mini", "tiny-moe-shared", "tiny-moe-8x2"])
def test_a_preset_takes_the_values_of_the_model_built_whole(preset):
    # what `torch.manual_seed(seed)` then building the model on the CPU gives, remade one module at a time
    for seed in (0, 3):
        source = load_model(preset, seed=seed, meta=True)
        made = source.model
        materialize(made, torch.device("cpu"), source.weights)
        torch.manual_seed(seed)
        whole = type(made)(made.config)
        assert made.state_dict().keys() == whole.state_dict().keys()
        assert all(torch.equal(t, whole.state_dict()[k]) for k, t in made.state_dict().items()), preset
        assert (made.lm_head.weight is made.model.embed_tokens.weight) == made.config.tie_word_embeddings


def test_tied_embeddings_take_the_lm_heads_draw_as_when_built_whole():
    config = LlamaConfig.from_name("tiny", tie_word_embeddings=True)
    with torch.device("meta"):
        made = Llama(config)
    materialize(made, torch.device("cpu"), SeededWeights(made, seed=7))
    torch.manual_seed(7)
    whole = Llama(config)
    assert made.lm_head.weight is made.model.embed_tokens.weight
    assert all(torch.equal(t, whole.state_dict()[k]) for k, t in made.state_dict().items())


def split_like_ep(model, rank: int, ranks: int) -> None:
    """What `Parallel.apply` does to the experts of a rank of an expert-parallel group (no process group needed)."""
    for m in model.modules():
        if isinstance(m, SwiGLUExperts):
            m.keep_local(ExpertGroup(None, ranks, rank, model.config.num_local_experts))


def test_a_split_preset_takes_its_part_of_the_whole_values():
    whole = state(load_model("tiny-moe-8x2", seed=3).model)
    source = load_model("tiny-moe-8x2", seed=3, meta=True)
    assert all(p.is_meta for p in source.model.parameters())
    split_like_ep(source.model, rank=1, ranks=4)  # experts 2 and 3
    materialize(source.model, torch.device("cpu"), source.weights)
    for name, t in state(source.model).items():
        assert torch.equal(t, whole[name][2:4] if is_routed_expert(name) else whole[name]), name


@pytest.mark.parametrize("format", ["mixtral", "qwen2_moe", "fused"])
def test_a_rank_reads_only_its_experts_from_a_checkpoint(tmp_path, format, monkeypatch):
    model = load_model("tiny-moe-shared" if format == "qwen2_moe" else "tiny-moe-8x2", seed=5).model
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt", format="mixtral" if format == "fused" else format)
    if format == "fused":  # transformers-5 names: each layer's experts one [E, 2F, H] and one [E, H, F] tensor
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("correction_bias")},
                  tmp_path / "ckpt" / "model.safetensors")
    whole = state(load_model(str(tmp_path / "ckpt")).model)  # fp32 from the bf16 file
    read, get = [], CheckpointReader.get

    def counted(reader, name, rows=None):
        t = get(reader, name, rows)
        read.append(t.nbytes)
        return t

    monkeypatch.setattr(CheckpointReader, "get", counted)
    source = load_model(str(tmp_path / "ckpt"), meta=True)
    E = model.config.num_local_experts
    split_like_ep(source.model, rank=1, ranks=2)
    materialize(source.model, torch.device("cpu"), source.weights)
    for name, t in state(source.model).items():
        assert t.dtype == torch.float32
        assert torch.equal(t, whole[name][E // 2:] if is_routed_expert(name) else whole[name]), name
    with CheckpointReader(tmp_path / "ckpt") as disk:
        sizes = {name: disk.nbytes(name) for name in disk.names()}
    experts = sum(n for name, n in sizes.items() if ".experts." in name)
    assert sum(read) == sum(sizes.values()) - experts // 2  # half of every layer's experts, nothing twice


def test_a_checkpoint_of_another_config_is_refused_before_anything_is_read(tmp_path):
    load_model("tiny-moe").model.save_pretrained(tmp_path / "ckpt")
    other = load_model("tiny-moe-8x2", meta=True).model
    with pytest.raises(CheckpointError, match=r"ckpt: tensor '.*' (is missing|has shape)"):
        CheckpointWeights(other, str(tmp_path / "ckpt"))
