"""moe.eval.score: sliding windows score every token once; `moekit eval` of a dense checkpoint and of its
function-preserving upcycle give the same loss and bits per byte, both equal to transformers on the same windows,
bits per byte is total nats / ln 2 / the text's UTF-8 bytes whatever the tokenizer, and the bootstrap interval
holds the estimate."""

import json
import math
import os
import shutil

import pytest
import torch

from moekit.moe.eval.score import DocumentScores, paired_difference, parse_data, separator, windows
from moekit.moe.train.tokenizer import load_tokenizer

from helpers import moekit, one_line_error, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "The old harbour town was quiet that spring. ü€",
         "x = [i * i for i in range(10)]\n" * 5]


@pytest.mark.parametrize("n, length, stride", [(2, 4, 2), (10, 4, 4), (37, 8, 3), (37, 8, 8), (5, 16, 8)])
def test_windows_score_every_token_once_with_context(n, length, stride):
    seen = []
    for a, b, first in windows(n, length, stride):
        assert b - a <= length and a < first <= b
        seen += list(range(first, b + 1))
        assert all(t - a >= min(length - stride, t) for t in range(first, b + 1) if t > length)  # context
    assert seen == list(range(1, n))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dense = tiny_checkpoint(root / "dense")
    other = tiny_checkpoint(root / "other", vocab_size=300)  # another tokenizer (and model)
    data = root / "docs"
    data.mkdir()
    for i, text in enumerate(TEXTS):
        (data / f"{i}.txt").write_text(text, encoding="utf-8")
    return str(dense), str(other), str(data)


def direct_nats(model_dir: str, texts: list[str], length: int, stride: int) -> list[float]:
    """Per document, -log p summed over its tokens, from transformers on the same windows."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(None, model_dir)
    out = []
    for text in texts:
        ids = separator(tok) + tok.encode(text)
        total = 0.0
        for a, b, first in windows(len(ids), length, stride):
            with torch.no_grad():
                logp = hf(input_ids=torch.tensor([ids[a:b]])).logits[0].double().log_softmax(-1)  # [b - a, V]
            total -= sum(logp[t - a - 1, ids[t]].item() for t in range(first, b + 1))
        out.append(total)
    return out


def test_dense_and_its_upcycle_score_alike_and_equal_transformers(checkpoints, tmp_path, capsys):
    dense, _, data = checkpoints
    moe = tmp_path / "moe"
    assert moekit(capsys, "upcycle", dense, moe, "--num-experts", "4", "--top-k", "2", "--no-progress")[0] == 0
    code, out, err = moekit(capsys, "eval", dense, str(moe), "--data", f"code={data}", "--max-length", "16",
                            "--stride", "8", "--batch-size", "3", "--json", "--no-progress")
    assert code == 0, err
    a, b = json.loads(out)["rows"]
    assert (a["model"], b["model"], a["data"]) == (dense, str(moe), "code")
    assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["bits_per_byte"] - b["bits_per_byte"]) <= 1e-5
    nats = direct_nats(dense, TEXTS, 16, 8)
    tok = load_tokenizer(None, dense)
    tokens = sum(len(tok.encode(t)) for t in TEXTS)
    nbytes = sum(len(t.encode()) for t in TEXTS)
    assert (a["tokens"], a["bytes"], a["documents"]) == (tokens, nbytes, 3)
    assert abs(a["loss"] - sum(nats) / tokens) <= 1e-5
    assert abs(a["bits_per_byte"] - sum(nats) / math.log(2) / nbytes) <= 1e-5
    assert abs(a["perplexity"] - math.exp(a["loss"])) <= 1e-9
    assert a["loss_low"] <= a["loss"] <= a["loss_high"] and a["bits_per_byte_low"] < a["bits_per_byte_high"]
    gap = json.loads(out)["gaps"][0]  # the upcycle against the dense model, paired over the documents
    assert (gap["model"], gap["baseline"], gap["data"]) == (str(moe), dense, "code")
    assert abs(gap["bits_per_byte_diff"]) <= 1e-5 and gap["bits_per_byte_diff_high"] - gap["bits_per_byte_diff_low"] \
        <= 1e-5


def test_a_paired_gap_is_tighter_than_either_interval():
    base = DocumentScores([100.0, 300.0, 50.0, 220.0], [50, 120, 20, 90], [200, 500, 90, 400])
    other = DocumentScores([n - 5.0 for n in base.nats], base.tokens, base.bytes)  # 5 nats better on every doc
    gap = paired_difference(base, other)
    assert gap["bits_per_byte_diff"] == pytest.approx(-20 / math.log(2) / 1190)
    lo, hi = gap["bits_per_byte_diff_low"], gap["bits_per_byte_diff_high"]
    assert lo <= gap["bits_per_byte_diff"] <= hi < 0  # lower on every resample
    one = base.summary()
    assert hi - lo < one["bits_per_byte_high"] - one["bits_per_byte_low"]


def test_different_tokenizers_count_the_same_bytes(checkpoints, capsys):
    dense, other, data = checkpoints
    code, out, err = moekit(capsys, "eval", dense, other, "--data", data, "--json", "--no-progress", "--max-length",
                            "64")
    assert code == 0, err
    a, b = json.loads(out)["rows"]
    assert a["bytes"] == b["bytes"] == sum(len(t.encode()) for t in TEXTS)  # one byte count for both models ...
    assert a["tokens"] != b["tokens"]  # ... from different numbers of tokens


def test_the_table_and_one_document_without_an_interval(checkpoints, tmp_path, capsys):
    dense, _, _ = checkpoints
    (tmp_path / "one.txt").write_text(TEXTS[0])
    code, out, err = moekit(capsys, "eval", dense, "--data", str(tmp_path / "one.txt"), "--no-progress")
    assert code == 0 and "one.txt" in out and "(one document)" in out and "bits/byte" in out, out + err
    s = DocumentScores([10.0, 20.0, 30.0], [10, 10, 10], [40, 40, 40]).summary()
    assert s["loss"] == 2.0 and s["loss_low"] < 2.0 < s["loss_high"] and s["bits_per_byte"] == 60 / math.log(2) / 120


def test_bad_input_is_one_line(checkpoints, tmp_path, capsys):
    dense, _, data = checkpoints
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(os.path.join(dense, name), bare / name)
    (tmp_path / "empty.txt").write_text("")
    assert "no tokenizer.json; moekit eval reads the text through each model's own tokenizer" in one_line_error(
        capsys, "eval", bare, "--data", data)
    assert "holds no text to score" in one_line_error(capsys, "eval", dense, "--data", tmp_path / "empty.txt")
    assert "--routing needs an MoE checkpoint; model_type 'llama' has no routed experts" in one_line_error(
        capsys, "eval", dense, "--data", data, "--routing")
    assert "data not found" in one_line_error(capsys, "eval", dense, "--data", tmp_path / "nowhere")
    assert "nothing to evaluate" in one_line_error(capsys, "eval", dense)
    assert "--stride 9 is longer than the window" in one_line_error(capsys, "eval", dense, "--data", data,
                                                                    "--max-length", "8", "--stride", "9")
    assert "the label 'a' is given twice" in one_line_error(capsys, "eval", dense, "--data", f"a={data}",
                                                            f"a={data}")
    assert [d.label for d in parse_data(["code=x", "builtin:arith", "/p/q/"])] == ["code", "builtin:arith", "q"]
