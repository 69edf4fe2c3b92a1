"""moe.train.data: the built-in data, deterministic train / validation windows, text and .npy sources."""

import numpy as np
import torch

from moe.train import TrainOptions, train
from moe.train.data import TokenData, arith_text

FAST = dict(batch_size=8, seq_len=32, warmup=5, log_every=10, eval_every=20, eval_batches=2, progress=False)
CLI_FAST = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]


def test_arith_data_is_deterministic_and_split():
    assert arith_text(3) == arith_text(3) and arith_text(3).count("\n") == 3
    a, b = arith_text(1).split("+")
    assert int(a) + int(b.split("=")[0]) == int(b.split("=")[1])
    data = TokenData(np.arange(1000), seq_len=9)
    assert len(data.val) == 50 and data.val[0] == 950  # the last 5%
    w = data.train_batch(step=3, batch_size=4)
    assert w.shape == (4, 10) and (w[:, 1:] - w[:, :-1] == 1).all()
    assert torch.equal(torch.cat([data.train_batch(3, 2, rank=r, world=2) for r in (0, 1)]), w)
    assert torch.equal(data.train_batch(3, 2, accum=2), w)  # batch 4 = batch 2 x accum 2
    w8 = data.train_batch(4, batch_size=4, accum=2)  # one process, micro-batches of 4
    ranks = [data.train_batch(4, 2, accum=2, rank=r, world=2) for r in (0, 1)]  # two processes of 2
    for i in range(2):  # micro-batch i of both processes together = micro-batch i of the one process
        assert torch.equal(torch.cat([r[2 * i:2 * i + 2] for r in ranks]), w8[4 * i:4 * i + 4])


def test_text_and_npy_data(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 200)
    np.save(tmp_path / "ids.npy", np.arange(2000) % 256)
    for data in (str(tmp_path / "a.txt"), str(tmp_path), str(tmp_path / "ids.npy")):
        r = train(TrainOptions(model="tiny", data=data, steps=2, batch_size=2, seq_len=16, eval_batches=1,
                              progress=False), log=None)
        assert np.isfinite(r.val_loss)


