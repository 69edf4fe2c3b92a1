"""moe.train.source: what a run trains, from a checkpoint directory (by model_type) or a preset, and the learning
rate a checkpoint's own training ended at."""

import json

import pytest

from moekit.llama import Llama
from moekit.llama.errors import MoekitError
from moekit.moe import MoEForCausalLM
from moekit.moe.train.source import load_model, source_final_lr

from helpers import saved_model


@pytest.mark.parametrize("name, cls", [("llama", Llama), ("mixtral", MoEForCausalLM), ("qwen2_moe", MoEForCausalLM)])
def test_a_checkpoint_loads_in_fp32_train_mode(tmp_path, name, cls):
    model, path = saved_model(tmp_path, name)
    source = load_model(str(path))
    assert type(source.model) is cls and source.model.training and source.directory == str(path)
    assert source.config["model_type"] == name and next(source.model.parameters()).dtype.is_floating_point
    assert all((a == b).all() for a, b in zip(source.model.state_dict().values(), model.state_dict().values()))


def test_a_preset_is_seeded_and_another_model_type_is_one_line(tmp_path):
    a, b = load_model("tiny-moe", seed=3), load_model("tiny-moe", seed=3)
    assert a.directory is None and a.description == "preset tiny-moe"
    assert all((x == y).all() for x, y in zip(a.model.parameters(), b.model.parameters()))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MoekitError, match="model_type 'gpt2' cannot be trained; expected llama, moe, mixtral, qwen2_moe"):
        load_model(str(tmp_path))
    with pytest.raises(MoekitError, match="not a checkpoint directory nor a preset"):
        load_model("no-such-preset")


def test_final_lr_of_a_run_and_of_the_model_it_was_upcycled_from(tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "train_config.json").write_text(json.dumps({"schedule": {"final_lr": 3e-4}}))
    (tmp_path / "moe").mkdir()  # the upcycler records the dense run's final lr in the MoE's own upcycling.json
    (tmp_path / "moe" / "upcycling.json").write_text(json.dumps({"source": str(tmp_path / "dense"),
                                                                 "source_final_lr": 2e-4}))
    assert source_final_lr(str(tmp_path / "dense")) == 3e-4 and source_final_lr(str(tmp_path / "moe")) == 2e-4
    assert source_final_lr(None) is None and source_final_lr(str(tmp_path)) is None


def test_a_recorded_source_is_never_followed(tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "train_config.json").write_text(json.dumps({"schedule": {"final_lr": 3e-4}}))
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "upcycling.json").write_text(json.dumps({"source": str(tmp_path / "dense")}))
    assert source_final_lr(str(tmp_path / "moe")) is None  # no "source_final_lr" of its own


@pytest.mark.parametrize("value", [1e30, 0, -1e-3, "3e-4", True, [1e-4], 10**400])
def test_a_recorded_learning_rate_is_checked_as_lr_is(tmp_path, value):
    (tmp_path / "upcycling.json").write_text(json.dumps({"source_final_lr": value}))
    with pytest.raises(MoekitError, match="upcycling.json: source_final_lr .* expected a number in \\(0, 1\\]"):
        source_final_lr(str(tmp_path))
    (tmp_path / "train_config.json").write_text(json.dumps({"schedule": {"final_lr": value}}))
    with pytest.raises(MoekitError, match="train_config.json: schedule.final_lr"):
        source_final_lr(str(tmp_path))
