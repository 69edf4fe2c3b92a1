"""moe.train.budget, absurd sizes through the command line: a run whose batch, accumulation, evaluation or windows
would need more memory than the machine has is refused before anything is allocated, in one line giving the
estimate, what is available and what to lower; the estimate of a normal run fits (tests/hostile.py)."""

import pytest

from moekit.llama.io import memory_available
from moekit.moe.train import TrainOptions
from moekit.moe.train.budget import run_bytes
from moekit.moe.train.parallel import Layout, is_routed_expert
from moekit.moe.train.source import load_model

from hostile import refused

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"--batch-size": "2", "--seq-len": "8", "--eval-batches": "1", "--grad-accum": "1"}


@pytest.mark.parametrize("model, sizes", [
    ("tiny", {"--batch-size": str(10**12)}),
    ("tiny", {"--grad-accum": str(10**9), "--seq-len": "64"}),
    ("tiny", {"--eval-batches": str(10**9), "--seq-len": "64"}),
    ("tiny-moe", {"--batch-size": str(10**7), "--seq-len": "255"}),  # long windows of a large batch
], ids=["batch-size", "grad-accum", "eval-batches", "seq-len-x-batch"])
def test_an_absurd_size_is_refused_before_allocating(model, sizes, tmp_path, capsys):
    args = [a for k, v in {**SMALL, **sizes}.items() for a in (k, v)]
    err = refused(capsys, "train", model, "--out", tmp_path / "out", "--steps", "1", "--no-progress", *args,
                  watch=[tmp_path])
    assert "needs about" in err and "GB is available; lower --batch-size, --grad-accum, --eval-batches" in err, err


def test_the_estimate_of_a_normal_run_is_small_and_counts_each_part():
    model = load_model("tiny-moe").model
    o = TrainOptions(model="tiny-moe", batch_size=8, grad_accum=2, seq_len=128, eval_batches=4)
    need = run_bytes(o, model, Layout(world=2))
    params = sum(p.numel() for p in model.parameters())
    assert need["optimizer"] == 12 * params
    assert need["windows"] == 8 * ((2 * 8 + 4 * 8) * 129 + (2 + 4) * 8 * 2)
    assert 0 < sum(need.values()) < 1e9 < (memory_available() or 2e9)


def test_a_split_run_counts_this_process_share():
    model = load_model("tiny-moe", meta=True).model  # nothing loaded: the estimate needs only the shapes
    o = TrainOptions(model="tiny-moe", batch_size=8, seq_len=128)
    experts = sum(p.numel() for n, p in model.named_parameters() if is_routed_expert(n))
    dense = sum(p.numel() for p in model.parameters()) - experts
    assert run_bytes(o, model, Layout(world=4, shard=4))["weights"] == 4 * (dense + experts) / 4
    assert run_bytes(o, model, Layout(world=4, expert=2))["weights"] == 4 * (dense + experts / 2)
    assert run_bytes(o, model, Layout(world=4, shard=2, expert=2))["weights"] == 4 * (dense / 2 + experts / 4)
