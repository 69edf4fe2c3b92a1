"""moe.train.tokenizer, hostile and careless text through the command line: `moekit tokenizer train` on empty or
non-UTF-8 data is one line and writes nothing; a full disk while saving the tokenizer is one line naming OUT and
leaves no temporary; a line far longer than the `tokenizers` library should take at once is tokenised in pieces,
with the ids of the whole for normal text (tests/hostile.py)."""

import errno
import json
import os

import pytest
from test_moe_train_data_safety import jsonl, refused_when_files_are_limited

from moekit.moe.train import tokenizer as tokenizer_module
from moekit.moe.train.tokenizer import HFTokenizer, pieces

from helpers import bpe_tokenizer, corpus, moekit
from hostile import refused

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZE = ["--vocab-size", "300", "--no-progress"]


@pytest.mark.parametrize("case", ["empty-file", "blank-jsonl"])
def test_tokenizer_train_on_empty_data_writes_nothing(case, tmp_path, capsys):
    data = tmp_path / ("d.txt" if case == "empty-file" else "d.jsonl")
    if case == "empty-file":
        data.write_text("")
    else:
        jsonl(data, *[json.dumps({"text": t}) + "\n" for t in ("", "  \n", "\t")])
    err = refused(capsys, "tokenizer", "train", data, "--out", tmp_path / "tok", *TOKENIZE, watch=[tmp_path])
    assert "the data holds no text" in err and "no tokenizer written" in err


def test_tokenizer_train_on_text_that_is_not_utf8_is_one_line(tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", json.dumps({"text": "fine"}) + "\n", b'{"text": "\xff\xfe"}\n')
    err = refused(capsys, "tokenizer", "train", data, "--out", tmp_path / "tok", *TOKENIZE, watch=[tmp_path])
    assert "d.jsonl: line 2 is not UTF-8 text" in err
    jsonl(data, *[json.dumps({"text": "x = 1\ud800\n"}) + "\n"] * 5)  # lone surrogates: replaced, then trained on
    rc, out, err = moekit(capsys, "tokenizer", "train", data, "--out", tmp_path / "tok", *TOKENIZE)
    assert rc == 0 and "wrote" in out, err


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.py").write_text(corpus(1)[0])
    return tmp_path / "docs"


def test_a_file_size_limit_while_saving_the_tokenizer_is_one_line_naming_out(docs, tmp_path):
    err = refused_when_files_are_limited(4096, "tokenizer", "train", docs, "--out", tmp_path / "tok", *TOKENIZE,
                                         watch=[tmp_path / "tok", docs])
    assert f"{tmp_path / 'tok'}: cannot write the tokenizer (File too large" in err and ".tmp-" not in err, err


def test_a_full_disk_while_saving_the_tokenizer_is_one_line_naming_out(docs, tmp_path, capsys, monkeypatch):
    class FullDiskJson:
        @staticmethod
        def dump(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "tokenizer_config.json")

    monkeypatch.setattr(tokenizer_module, "json", FullDiskJson)
    err = refused(capsys, "tokenizer", "train", docs, "--out", tmp_path / "tok", *TOKENIZE,
                  watch=[tmp_path / "tok", docs])
    assert f"{tmp_path / 'tok'}: cannot write the tokenizer (No space left on device)" in err


# ---- long lines ----------------------------------------------------------------------------------------------

def test_pieces_give_the_ids_of_the_whole_for_normal_text(tmp_path, monkeypatch):
    bpe_tokenizer(tmp_path / "tok", bos=False)
    tok = HFTokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    text = "\n".join(corpus(2))  # 60k characters of Python: cut before whitespace after a letter or digit
    whole = tok.tok.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(tokenizer_module, "PIECE", 4096)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 10_000)
    assert len(pieces(text)) > 10 and "".join(pieces(text)) == text
    (ids,) = tok.encode_documents([text])
    assert ids.tolist() == [*whole, tok.eos_id]
    line = "x" * 50_000 + "=1;" * 5_000  # one line, no whitespace: cut anywhere, still every character kept
    (ids,) = tok.encode_documents([line])
    assert tok.decode(ids.tolist()[:-1]) == line


def test_a_very_long_line_is_tokenised_in_pieces(tmp_path, capsys, monkeypatch):
    """A 200 MB line aborted the `tokenizers` library (out of memory); here a 400k-character line and pieces of
    64k characters: train and tokenizer train both take it in pieces."""
    seen = []
    encode_batch = HFTokenizer._encode_pieces

    def spy(self, texts):
        seen.extend(len(t) for t in texts)
        return encode_batch(self, texts)

    monkeypatch.setattr(tokenizer_module, "PIECE", 1 << 16)
    monkeypatch.setattr(HFTokenizer, "_encode_pieces", spy)
    (tmp_path / "d.txt").write_text(("def f(x): return x + 1;  " * 16_000)[:400_000])
    rc, _, err = moekit(capsys, "tokenizer", "train", tmp_path / "d.txt", "--out", tmp_path / "tok", *TOKENIZE)
    assert rc == 0, err
    rc, _, err = moekit(capsys, "train", "tiny", "--data", tmp_path / "d.txt", "--tokenizer", tmp_path / "tok",
                        "--out", tmp_path / "out", "--steps", "1", "--batch-size", "2", "--seq-len", "8",
                        "--eval-batches", "1", "--no-progress")
    assert rc == 0, err
    assert len(seen) >= 7 and max(seen) <= 1 << 16 and sum(seen) == 400_000
