"""upcycle.recipe_file, hostile and careless recipes through `moekit upcycle --config`: a YAML alias bomb (as
positive_prompts, source_model or top_k) is refused within seconds, before anything walks or formats it; 10^5-deep
YAML or JSON, wrong-typed or unhashable values, unknown keys with control characters, oversized files and 200k
prompts are one line naming the key or the limit. Each refusal changes nothing (tests/hostile.py)."""

import json
import os

import pytest

from moekit.upcycle.options import MAX_PROMPT_CHARS, MAX_PROMPTS
from moekit.upcycle.recipe_file import MAX_RECIPE_BYTES

from hostile import refused, refused_in_time

TIMEOUT = 20  # seconds: a refusal takes about one (the child imports no torch); a bomb walked in full takes hours

LAUGHS = "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + LAUGHS  # *i: 9^9 strings
MERGEKIT = "base_model: B\nexperts:\n  - source_model: {model}\n    positive_prompts: {prompts}\n  - source_model: C\n" \
           "    positive_prompts: [y]\n"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def upcycle(recipe, tmp_path):
    return ["upcycle", "--config", recipe, tmp_path / "moe", "--no-progress"]


@pytest.mark.parametrize("recipe", [
    BOMB + MERGEKIT.format(model="A", prompts="*i"),  # the example: positive_prompts
    BOMB + MERGEKIT.format(model="*i", prompts="[x]"),  # source_model
    BOMB + "experts_per_token: *i\n" + MERGEKIT.format(model="A", prompts="[x]"),  # top_k
    BOMB + "donors: [A, C]\ntop_k: *i\n",  # moekit's own recipe
    'a: &a "' + "x" * 500_000 + '"\n' + MERGEKIT.format(model="A", prompts="[" + ", ".join(["*a"] * 20) + "]"),
], ids=["positive_prompts", "source_model", "experts_per_token", "moekit-top_k", "long-string-aliases"])
def test_alias_bombs_are_refused_in_seconds(tmp_path, recipe):
    path = write(tmp_path, "bomb.yml", recipe)
    err = refused_in_time(*upcycle(path, tmp_path), watch=[path, tmp_path / "moe"], timeout=TIMEOUT)
    assert f"{path}: more than " in err and "with YAML aliases expanded" in err and len(err) < 300, err


@pytest.mark.parametrize("name, text, message", [
    ("deep.json", '{"donors": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    ("deep.yml", "donors: " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid YAML (exceeded maximum nesting depth"),
    ("deep40.yml", "donors: " + "[" * 40 + "]" * 40 + "\n", "values nested more than 32 levels deep"),
    ("big-int.yml", "experts_per_token: " + "9" * 5000 + "\n" + MERGEKIT.format(model="A", prompts="[x]"),
     "not valid YAML (Exceeds the limit"),
    ("latin1.yml", "base_model: caf\xe9\n", "not UTF-8 text"),
])
def test_deep_huge_or_undecodable_recipes_are_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    err = refused(capsys, *upcycle(path, tmp_path), watch=[path, tmp_path / "moe"])
    assert message in err, err


@pytest.mark.parametrize("text, message", [
    ("base_model: B\ngate_mode: [hidden]\nexperts: [{source_model: A}]\n",
     "gate_mode ['hidden'] is not one of mergekit-moe's gate modes: hidden,"),  # the example (unhashable)
    ("base_model: B\ndtype: [a]\nexperts: [{source_model: A}]\n", "dtype ['a'] is not one of float32"),
    ("base_model: B\narchitecture: {a: 1}\nexperts: [{source_model: A}]\n",
     "architecture must be a string, got {'a': 1}"),
    ("base_model: B\ntokenizer_source: [base]\nexperts: [{source_model: A}]\n", "tokenizer_source ['base'] is not"),
    ("base_model: B\nexperts_per_token: [2]\nexperts: [{source_model: A}]\n",
     "top_k in the recipe must be one string, number or boolean, got [2]"),
    ("donors: [A]\ndtype: [a]\n", "dtype in the recipe must be one string, number or boolean, got ['a']"),
    ("donors: [A]\nrecipe: {copy: 1}\n", "recipe in the recipe must be one string, number or boolean"),
    ("donors: [A]\npositive_prompts: [[x]]\n", "positive_prompts in the recipe must be a list of strings or numbers"),
    ('donors: [A]\n"evil\\e[31m\\nkey": 1\n', "unknown key 'evil\\x1b[31m\\nkey' in the recipe"),
    ("donors: [A]\n? " + "k" * 200_000 + "\n: 1\n", "unknown key 'kkkk"),  # a 200 kB key
    ("".join(f"k{i}: 1\n" for i in range(5000)), "unknown keys 'k0', 'k1', 'k2' and 4,997 more in the recipe"),
])
def test_wrong_types_and_unknown_keys_name_the_key(tmp_path, capsys, text, message):
    path = write(tmp_path, "r.yml", text)
    err = refused(capsys, *upcycle(path, tmp_path), watch=[path, tmp_path / "moe"])
    assert f"{path}: " in err and message in err and len(err) < 1200, err


def test_200k_prompts_and_300k_characters_name_the_limit(tmp_path, capsys):
    prompts = "[" + ",".join(["a"] * 200_000) + "]"  # the example: 400 kB of flow YAML
    path = write(tmp_path, "many.yml", MERGEKIT.format(model="A", prompts=prompts))
    err = refused(capsys, *upcycle(path, tmp_path), watch=[path, tmp_path / "moe"])
    assert f"--positive-prompts: 200,001 prompts; at most {MAX_PROMPTS:,}" in err
    json_recipe = write(tmp_path, "many.json", json.dumps({"donors": ["A", "B"], "router_init": "hidden",
                                                           "negative_prompts": ["0:x"] * 5000}))
    err = refused(capsys, *upcycle(json_recipe, tmp_path), watch=[json_recipe, tmp_path / "moe"])
    assert f"--negative-prompts: 5,000 prompts; at most {MAX_PROMPTS:,}" in err
    path = write(tmp_path, "long.yml", MERGEKIT.format(model="A", prompts="[" + "x" * 300_000 + "]"))
    err = refused(capsys, *upcycle(path, tmp_path), watch=[path, tmp_path / "moe"])
    assert "a prompt of 300,002 characters ('0:xxx" in err and f"at most {MAX_PROMPT_CHARS:,}" in err


def test_oversized_and_special_recipe_files(tmp_path):
    path = write(tmp_path, "big.yml", "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    err = refused_in_time(*upcycle(path, tmp_path), watch=[path, tmp_path / "moe"], timeout=TIMEOUT)
    assert f"bytes; a recipe file holds at most {MAX_RECIPE_BYTES:,}" in err
    os.mkfifo(tmp_path / "fifo.yml")  # reading it would block for ever
    err = refused_in_time(*upcycle(tmp_path / "fifo.yml", tmp_path), watch=[tmp_path / "fifo.yml", tmp_path / "moe"],
                          timeout=TIMEOUT)
    assert "not a regular file" in err
