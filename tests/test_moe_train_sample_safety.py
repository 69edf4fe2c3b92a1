"""moe.train.sample, careless prompts and hostile tokenizers through `moekit generate`: an empty prompt is
continued from the BOS token where the tokenizer has one and refused otherwise; bytes a tokenizer decodes to that
are not UTF-8 print as replacement characters; a prompt that fills the model's context is one line naming the
limit, before anything is generated (tests/hostile.py)."""

import json

import pytest
import torch

from moekit.llama import Llama, LlamaConfig
from moekit.moe.train.sample import complete, for_terminal
from moekit.moe.train.tokenizer import load_tokenizer

from helpers import moekit, tiny_checkpoint
from hostile import refused

RULE = "-" * 40


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny checkpoints: one whose tokenizer starts sequences with <s> (id 0), one whose tokenizer does not."""
    root = tmp_path_factory.mktemp("ckpts")
    return tiny_checkpoint(root / "bos"), tiny_checkpoint(root / "no-bos", bos=False)


def greedy(ckpt, ids: list[int], n: int, stop=None) -> list[int]:
    """The model's own greedy continuation of `ids`, without moekit generate."""
    return Llama.from_pretrained(ckpt).generate(torch.tensor([ids]), max_new_tokens=n, stop_tokens=stop)[
        0, len(ids):].tolist()


def test_an_empty_prompt_is_continued_from_the_bos_token(checkpoints, capsys):
    ckpt = checkpoints[0]
    text = load_tokenizer(None, str(ckpt)).decode([i for i in greedy(ckpt, [0], 8, [1]) if i != 1])
    rc, out, err = moekit(capsys, "generate", ckpt, "--prompt", "", "--max-new-tokens", "8")
    assert (rc, err, out) == (0, "", f"{text}\n{RULE}\n")


def test_an_empty_prompt_without_a_bos_token_is_refused(checkpoints, capsys):
    ckpt = checkpoints[1]
    err = refused(capsys, "generate", ckpt, "--prompt", "", watch=[ckpt])
    assert "prompt '' encodes to no token, and the tokenizer has no BOS token to start from" in err


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory):
    """A checkpoint whose tokenizer holds 'a', 'b' and the bytes 0x80-0xBF, which alone are never UTF-8."""
    from tokenizers import Tokenizer, decoders, models

    path = tmp_path_factory.mktemp("ckpt") / "bytes"
    vocab = {"a": 0, "b": 1, **{f"<0x{b:02X}>": 2 + i for i, b in enumerate(range(0x80, 0xC0))}}
    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=64)).save_pretrained(path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.save(str(path / "tokenizer.json"))
    return path


def test_undecodable_bytes_print_as_replacement_characters(byte_fallback, capsys):
    new = greedy(byte_fallback, [0, 1], 20)
    text = "".join("ab"[i] if i < 2 else "\ufffd" for i in new)
    assert "\ufffd" in text
    rc, out, err = moekit(capsys, "generate", byte_fallback, "--prompt", "ab", "--max-new-tokens", "20")
    assert (rc, err, out) == (0, "", f"ab{text}\n{RULE}\n")


def test_undecodable_command_line_bytes_in_a_prompt_become_replacement_characters(byte_fallback, capsys):
    prompt = b"ab\xffa".decode("utf-8", "surrogateescape")  # as Python holds such bytes of argv
    rc, out, err = moekit(capsys, "generate", byte_fallback, "--prompt", prompt, "--max-new-tokens", "5", "--json")
    assert rc == 0, err
    assert json.loads(out)[0]["completion"] == complete(str(byte_fallback), ["ab\ufffda"], max_new_tokens=5)[0]


@pytest.mark.parametrize("prompts", [["ab " * 2000], ["def f():", "ab " * 127]], ids=["long", "second-fills"])
def test_a_prompt_that_fills_the_context_is_refused_naming_the_limit(prompts, checkpoints, capsys):
    ckpt = checkpoints[0]  # 256 positions
    err = refused(capsys, "generate", ckpt, "--prompt", *prompts, watch=[ckpt])
    assert "tokens; the model's context (max_position_embeddings) is 256 tokens" in err


def test_text_for_the_terminal_keeps_lines_and_escapes_control_characters():
    assert for_terminal("def f():\n\treturn \x1b[2J\x07" + b"\xff".decode("utf-8", "surrogateescape")) == \
        "def f():\n\treturn \\x1b[2J\\x07\ufffd"
