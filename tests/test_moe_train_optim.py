"""moe.train.optim: the warmup + cosine learning-rate schedule."""

import pytest

from moe.train import TrainOptions, lr_at

FAST = dict(batch_size=8, seq_len=32, warmup=5, log_every=10, eval_every=20, eval_batches=2, progress=False)
CLI_FAST = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]


def test_lr_schedule():
    cfg = TrainOptions(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


