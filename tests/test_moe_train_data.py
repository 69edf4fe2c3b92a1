"""moe.train.data: the built-in data, deterministic train / validation windows, text and .npy sources."""

import json
import os

import numpy as np
import pytest
import torch

from moekit.moe.train import TrainOptions, train
from moekit.moe.train.data import TokenData, arith_text, load_tokens
from moekit.moe.train.tokenizer import ByteTokenizer

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




# ---- sources and the token cache ----------------------------------------------------------------------------

def test_a_directory_is_read_recursively_in_a_fixed_order_skipping_what_is_not_a_text_file(tmp_path):
    from moekit.moe.train.data import text_files

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("z")
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "x.txt").mkdir()  # a directory with a text suffix
    (tmp_path / "data.bin").write_bytes(b"\0")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("h")
    assert [os.path.relpath(p, tmp_path) for p in text_files(str(tmp_path))] == ["a.md", "b/z.py"]


def test_jsonl_and_datasets_sources_give_the_same_stream(tmp_path):
    texts = ["first document", "second one, longer " * 5, "third"]
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
    tok = ByteTokenizer()
    want = [b for t in texts for b in t.encode()]
    ids, where = load_tokens(str(tmp_path / "d.jsonl"), tok, 256, text_field="body", cache_dir=str(tmp_path / "c"))
    assert ids.tolist() == want and "field 'body'" in where
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    ids, where = load_tokens(str(tmp_path / "ds"), tok, 256, text_field="body", cache_dir=str(tmp_path / "c"))
    assert ids.tolist() == want and "datasets" in where


def test_tokenised_data_is_cached_and_reused(tmp_path, monkeypatch):
    from moekit.moe.train import data

    (tmp_path / "a.txt").write_text("hello world " * 50)
    first, _ = load_tokens(str(tmp_path / "a.txt"), ByteTokenizer(), 256, cache_dir=str(tmp_path / "c"))
    def tokenize(*a):
        raise RuntimeError("tokenised twice")

    monkeypatch.setattr(data, "_tokenize", tokenize)
    again, _ = load_tokens(str(tmp_path / "a.txt"), ByteTokenizer(), 256, cache_dir=str(tmp_path / "c"))
    assert np.array_equal(first, again) and isinstance(again, np.memmap) and len(os.listdir(tmp_path / "c")) == 1
    (tmp_path / "a.txt").write_text("changed")  # new content: a new key
    with pytest.raises(RuntimeError, match="tokenised twice"):
        load_tokens(str(tmp_path / "a.txt"), ByteTokenizer(), 256, cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("case, words", [
    ("empty", "holds no tokens"),
    ("short", "too few for windows"),
    ("no-field", "line 2 has no text field 'text'"),
    ("not-json", "line 1 is not JSON"),
    ("missing", "data not found"),
    ("empty-dir", "no text files in the data directory"),
    ("val-short", "the validation data has 3 tokens"),
])
def test_bad_data_is_one_line_before_any_step(tmp_path, capsys, case, words):
    from helpers import one_line_error

    extra = []
    if case == "empty":
        (tmp_path / "d.txt").write_text("")
    elif case == "short":
        (tmp_path / "d.txt").write_text("tiny")
    elif case == "no-field":
        (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
    elif case == "not-json":
        (tmp_path / "d.jsonl").write_text("{oops\n")
    elif case == "empty-dir":
        (tmp_path / "d").mkdir()
    elif case == "val-short":
        (tmp_path / "d.txt").write_text("long enough text " * 40)
        (tmp_path / "v.txt").write_text("abc")
        extra = ["--val-data", str(tmp_path / "v.txt")]
    data = next((str(p) for p in tmp_path.iterdir()), str(tmp_path / "nowhere.txt"))
    if case in ("val-short",):
        data = str(tmp_path / "d.txt")
    err = one_line_error(capsys, "train", "tiny", "--out", tmp_path / "out", "--data", data, "--seq-len", "16",
                         *extra)
    assert words in err, err
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()
