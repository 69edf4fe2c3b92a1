"""upcycle.routers, prompts longer than the model reads, through `moekit upcycle --donors ... --router-init hidden`
and mergekit recipes: a 300k-character prompt is refused within seconds, before anything tokenises it; a prompt of
more tokens than max_position_embeddings is one line naming the limit; the base's tokenizer.json is read only from
inside the base. Each refusal changes nothing (tests/hostile.py)."""

import os
import shutil

import pytest

from moekit.upcycle.options import MAX_PROMPT_CHARS

from hostile import SECRET, outside_file, refused, refused_in_time

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = "The old harbour town woke slowly under a grey sky. " * 60  # 3,060 characters, far more than 256 tokens


def merge(tmp_path, donors, *extra) -> list:
    return ["upcycle", tmp_path / "moe", "--donors", *donors[1], "--no-progress", *extra]


def recipe(tmp_path, donors, gate: str, prompt: str, kind: str = "positive"):
    path = tmp_path / "merge.yml"
    path.write_text(f"base_model: {donors[0]}\ngate_mode: {gate}\nexperts:\n" + "".join(
        f"  - source_model: {d}\n    positive_prompts: [x]\n" for d in donors[1]) + f"    {kind}_prompts: ['{prompt}']\n")
    return path


def test_a_300k_character_prompt_is_refused_in_seconds(donors, tmp_path, capsys):
    path = recipe(tmp_path, donors, "hidden", "x" * 300_000)  # in a file: one argument holds at most 128 kB
    err = refused_in_time("upcycle", "--config", path, tmp_path / "moe", "--no-progress",
                          watch=[tmp_path / "moe", path, donors[0]], timeout=20)
    assert "a prompt of 300,002 characters ('2:xxx" in err and f"at most {MAX_PROMPT_CHARS:,}" in err
    err = refused(capsys, *merge(tmp_path, donors, "--router-init", "cheap-embed", "--positive-prompts", "0:a", "1:b",
                                 "2:" + "y" * 300_000), watch=[tmp_path / "moe", donors[0]])
    assert "a prompt of 300,002 characters ('2:yyy" in err and f"at most {MAX_PROMPT_CHARS:,}" in err


def test_a_prompt_longer_than_the_context_names_the_limit(donors, tmp_path, capsys):
    err = refused(capsys, *merge(tmp_path, donors, "--router-init", "hidden", "--positive-prompts", "0:" + LONG,
                                 "1:b", "2:c"), watch=[tmp_path / "moe", donors[0]])
    assert "--positive-prompts: prompt 'The old harbour town woke slowly under a...' (3,060 characters) of " \
           "expert 0 is" in err and f"tokens with {donors[1][0]}/tokenizer.json; the model reads at most 256 (its " \
           "max_position_embeddings)" in err
    path = recipe(tmp_path, donors, "cheap_embed", LONG, "negative")  # the variant: a negative prompt, cheap_embed
    err = refused(capsys, "upcycle", "--config", path, tmp_path / "moe", "--no-progress",
                  watch=[tmp_path / "moe", path])
    assert "--negative-prompts: prompt 'The old" in err and "of expert 2 is" in err and "at most 256" in err


def test_the_bases_tokenizer_is_read_only_from_inside_it(donors, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(donors[0], base)
    os.remove(base / "tokenizer.json")
    os.symlink(outside_file(tmp_path, "tokenizer.json"), base / "tokenizer.json")
    err = refused(capsys, *merge(tmp_path, donors, "--base", base, "--router-init", "hidden", "--positive-prompts",
                                 "0:a", "1:b", "2:c", "--tokenizer-source", "base"), watch=[tmp_path / "moe", base])
    assert "tokenizer.json' points outside the checkpoint; refusing to read it" in err and SECRET not in err
