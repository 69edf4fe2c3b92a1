"""moe.train.tokenizer: text goes through the checkpoint's own tokenizer (exactly `tokenizer.encode` of the text,
documents joined by its convention), another one, or bytes; never a silent byte fall-back."""

import json

import numpy as np
import pytest
import transformers

from moekit.llama.model import Llama
from moekit.moe.train import TrainOptions, train
from moekit.moe.train.data import load_tokens
from moekit.moe.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

from helpers import bpe_tokenizer, corpus, one_line_error, tiny_checkpoint


@pytest.mark.parametrize("bos", [True, False], ids=["bos-convention", "eos-convention"])
def test_documents_are_joined_by_the_tokenizers_convention(tmp_path, bos):
    tok = bpe_tokenizer(tmp_path / "tok", bos=bos)
    ours = load_tokenizer(str(tmp_path / "tok"), None)
    assert isinstance(ours, HFTokenizer) and (ours.bos_id, ours.eos_id) == (0, 1)
    assert ours.convention == ("bos" if bos else "eos")
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = corpus(2)
    for i, t in enumerate(texts):
        (docs / f"{i}.py").write_text(t)
    ids, where = load_tokens(str(docs), ours, vocab_size=320, cache_dir=str(tmp_path / "cache"))
    plain = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    want = [0, *plain[0], 0, *plain[1]] if bos else [*plain[0], 1, *plain[1], 1]
    assert ids.tolist() == want and "2 text files" in where


def test_the_model_sees_exactly_the_tokenizers_ids(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    text = corpus(1)[0]
    (tmp_path / "data.txt").write_text(text)
    stream = [0, *HFTokenizer(str(ckpt / "tokenizer.json")).tok.encode(text, add_special_tokens=False).ids]
    seen = []
    forward = Llama.forward

    def spy(self, input_ids, *a, **kw):
        seen.extend(input_ids.tolist())
        return forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(Llama, "forward", spy)
    train(TrainOptions(model=str(ckpt), data=str(tmp_path / "data.txt"), steps=2, batch_size=2, seq_len=16,
                       eval_batches=1, progress=False), log=None)
    joined = ",".join(map(str, stream))
    assert len(seen) > 4 and all(",".join(map(str, w)) in joined for w in seen)  # every window is a slice of it


def test_bytes_and_presets(tmp_path):
    assert load_tokenizer("bytes", None).encode("hé") == [104, 195, 169]
    assert isinstance(load_tokenizer("bytes", str(tmp_path)), ByteTokenizer)
    assert load_tokenizer(None, None) is None  # a preset: the trainer chooses bytes
    ByteTokenizer().save(str(tmp_path))  # what a byte-level model's output holds: read back as bytes, anywhere
    text = "Héllo  wörld\n\t417+86=503 ✓"
    back = load_tokenizer(None, str(tmp_path))
    assert isinstance(back, ByteTokenizer) and back.directory == str(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text).input_ids == list(text.encode()) and hf.decode(list(text.encode())) == text


def test_text_for_a_checkpoint_without_a_tokenizer_is_refused(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tokenizer=False)
    (tmp_path / "d.txt").write_text("some text " * 100)
    err = one_line_error(capsys, "train", ckpt, "--out", tmp_path / "out", "--data", tmp_path / "d.txt")
    assert "has no tokenizer.json: pass --tokenizer PATH" in err and not (tmp_path / "out.partial").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", vocab_size=200, tokenizer=False)
    bpe_tokenizer(tmp_path / "big", vocab_size=320)
    err = one_line_error(capsys, "train", ckpt, "--out", tmp_path / "out", "--tokenizer", tmp_path / "big")
    assert "has ids up to 319; the model's vocab_size is 200" in err


def test_another_tokenizer_goes_into_the_output(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tokenizer=False)
    bpe_tokenizer(tmp_path / "tok")
    (tmp_path / "d.txt").write_text(corpus(1)[0])
    train(TrainOptions(model=str(ckpt), out=str(tmp_path / "out"), data=str(tmp_path / "d.txt"),
                       tokenizer=str(tmp_path / "tok" / "tokenizer.json"), steps=1, batch_size=2, seq_len=16,
                       eval_batches=1, progress=False), log=None)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert np.isfinite(json.loads((tmp_path / "out" / "train_config.json").read_text())["val_loss"])


def test_moekit_tokenizer_train_writes_a_tokenizer_the_trainer_and_transformers_read(tmp_path, capsys):
    from helpers import moekit

    (tmp_path / "docs").mkdir()
    for i, t in enumerate(corpus(3)):
        (tmp_path / "docs" / f"{i}.py").write_text(t)
    rc, out, err = moekit(capsys, "tokenizer", "train", tmp_path / "docs", "--out", tmp_path / "tok", "--vocab-size",
                          "400", "--no-progress")
    assert rc == 0 and "trained a 400-token byte-level BPE tokenizer on" in out and "3 text files" in out, err
    ours = load_tokenizer(str(tmp_path / "tok"), None)
    assert ours.num_ids == 400 and ours.eos_id == 0 and ours.convention == "eos"
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = corpus(1)[0][:500]
    assert hf(text).input_ids == ours.encode(text) and hf.decode(ours.encode(text)) == text
    assert "already exists" in one_line_error(capsys, "tokenizer", "train", tmp_path / "docs", "--out", tmp_path / "tok")
    assert "vocab-size must be in [257" in one_line_error(capsys, "tokenizer", "train", tmp_path / "docs", "--out",
                                                          tmp_path / "t2", "--vocab-size", "10")


def test_the_standard_library_is_built_in_data_split_by_file():
    from moekit.moe.train.data import Documents

    train, held_out = Documents("builtin:python-stdlib", "text"), Documents("builtin:python-stdlib-val", "text")
    assert len(train.files) > 10 * len(held_out.files) > 0 and not set(train.files) & set(held_out.files)
    assert all(f.endswith(".py") and "/test/" not in f for f in train.files + held_out.files)
    assert Documents("builtin:python-stdlib", "text").files == train.files  # a fixed selection


def chat_tokenizer(directory, eos: str = "<|im_end|>", extra=("<|endoftext|>",)):
    """A BPE tokenizer like a chat checkpoint's: <|im_start|>, <|im_end|> (its EOS) and `extra` special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus(1), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", *extra], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return tok


def test_a_chat_tokenizer_ends_documents_with_its_document_token_not_its_end_of_turn(tmp_path, capsys):
    tok = chat_tokenizer(tmp_path / "chat")
    ours = load_tokenizer(str(tmp_path / "chat"), None)
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert (ours.eos_id, ours.separator_id, ours.convention) == (im_end, eot, "eos")
    assert ours.encode_documents(["ab", "c"])[0][-1] == eot
    chat_tokenizer(tmp_path / "plain", extra=())  # no document token: its EOS it is
    assert load_tokenizer(str(tmp_path / "plain"), None).separator_id == im_end
    ours.set_separator("<|im_end|>")
    assert ours.encode_documents(["ab"])[0][-1] == im_end
    with pytest.raises(Exception, match=r"--doc-separator '<eos>' is not a special token of .*; its special tokens: "
                                        r"<\|endoftext\|>, <\|im_end\|>, <\|im_start\|>"):
        ours.set_separator("<eos>")
    # through the trainer: a different separator is different data (another cache entry), and bytes have none
    (tmp_path / "d.txt").write_text(corpus(1)[0][:3000])
    common = dict(model="tiny", out=None, data=str(tmp_path / "d.txt"), tokenizer=str(tmp_path / "chat"), steps=1,
                  batch_size=2, seq_len=16, eval_batches=1, progress=False, token_cache=str(tmp_path / "cache"))
    train(TrainOptions(**common), log=None)
    train(TrainOptions(**common, doc_separator="<|im_end|>"), log=None)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert "--doc-separator '<|im_end|>': the bytes tokenizer has no special tokens" in one_line_error(
        capsys, "train", "tiny", "--out", tmp_path / "x", "--data", tmp_path / "d.txt", "--doc-separator",
        "<|im_end|>")
