"""moe.train.sharded: a training state is keyed by what each tensor is (each expert on its own), saved with
torch.distributed.checkpoint and loaded back into live weights and moments; a replicated run's accelerate state
loads through the same keys. (Across processes and layouts: tests/test_moe_train_parallel.py.)"""

import torch

from moekit.moe.train.optim import Schedule, make_optimizer
from moekit.moe.train.sharded import init_moments, is_sharded_state, load, save, state_tensors
from moekit.moe.train.source import load_model


def trained(seed: int):
    model = load_model("tiny-moe-shared", seed=seed).model
    optimizer, _ = make_optimizer(model, Schedule(1e-3, 0, 10), 0.1, (0.9, 0.95))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids, return_logits=False).loss.backward()
    optimizer.step()
    model.model.layers[1].mlp.gate.e_score_correction_bias += seed + 1  # router state, not a parameter
    return model, optimizer


def test_keys_name_each_expert_and_are_views_of_the_live_tensors():
    model, optimizer = trained(0)
    keys = state_tensors(model, optimizer, rank=0)
    assert "model.model.layers.1.mlp.experts.down_proj.3" in keys and "rng.0" in keys
    assert "optim.model.layers.2.mlp.experts.gate_up_proj.2.exp_avg_sq" in keys
    assert "model.model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert keys["model.model.layers.1.mlp.experts.down_proj.3"].data_ptr() == \
        model.model.layers[1].mlp.experts.down_proj[3].data_ptr()  # a view: loading writes the weight


def test_a_saved_state_loads_into_another_model_exactly(tmp_path):
    model, optimizer = trained(0)
    save(str(tmp_path / "state"), model, optimizer, rank=0)
    assert is_sharded_state(str(tmp_path / "state"))
    other, other_optimizer = make_other()
    load(str(tmp_path / "state"), other, other_optimizer, rank=0, same_world=True)
    a, b = state_tensors(model, optimizer, 0), state_tensors(other, other_optimizer, 0)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def make_other():
    model = load_model("tiny-moe-shared", seed=1).model
    optimizer, _ = make_optimizer(model, Schedule(1e-3, 0, 10), 0.1, (0.9, 0.95))
    init_moments(optimizer)
    return model, optimizer


def test_a_crafted_index_never_runs_code(tmp_path):
    import os
    import pickle

    import pytest

    model, optimizer = trained(0)
    save(str(tmp_path / "state"), model, optimizer, rank=0)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(Payload()))
    other, other_optimizer = make_other()
    with pytest.raises(Exception, match="not part of a training state"):
        load(str(tmp_path / "state"), other, other_optimizer, rank=0, same_world=True)
    assert not marker.exists()
