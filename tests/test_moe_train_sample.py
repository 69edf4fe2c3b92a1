"""moe.train.sample (`moekit generate`): completions from a checkpoint with its own tokenizer, greedy by default."""

import json

import torch

from moekit.llama import Llama
from moekit.moe.train.sample import complete
from moekit.moe.train.tokenizer import load_tokenizer

from helpers import moekit, one_line_error, tiny_checkpoint


def test_greedy_completions_are_the_models_own(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")  # its tokenizer starts sequences with <s>
    tok = load_tokenizer(None, str(ckpt))
    prompt = "def main():"
    ids = [0, *tok.encode(prompt)]
    want = Llama.from_pretrained(ckpt).generate(torch.tensor([ids]), max_new_tokens=12, stop_tokens=[1])[0, len(ids):]
    text = complete(str(ckpt), [prompt], max_new_tokens=12)[0]
    assert text == tok.decode([i for i in want.tolist() if i != 1]) and len(want) > 0
    rc, out, _ = moekit(capsys, "generate", ckpt, "--prompt", prompt, "class A:", "--max-new-tokens", "12", "--json")
    got = json.loads(out)
    assert rc == 0 and [g["prompt"] for g in got] == [prompt, "class A:"] and got[0]["completion"] == text
    sampled = complete(str(ckpt), [prompt], max_new_tokens=12, temperature=1.0, seed=3)
    assert sampled == complete(str(ckpt), [prompt], max_new_tokens=12, temperature=1.0, seed=3)  # seeded


def test_a_checkpoint_without_a_tokenizer(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tokenizer=False)
    assert "no tokenizer.json" in one_line_error(capsys, "generate", ckpt)
