"""upcycle.donors, incompatible donors through `moekit upcycle --donors` and recipes: a donor of another vocabulary
(a 256-id model beside 320-id BPE ones) or another tokenizer.json vocabulary (the same size, ids swapped) does not
merge, in one line naming the donor and what differs, unless the recipe says to use the base's tokenizer
(`tokenizer_source: base`, for equal vocab sizes only; anything else is not supported yet). A donor's tokenizer.json
is read only from inside it. Each refusal changes nothing (tests/hostile.py)."""

import json
import os
import shutil

import pytest

from moekit.upcycle import read_record

from helpers import moekit, tiny_checkpoint
from hostile import SECRET, outside_file, refused

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def odd_donors(donors, tmp_path_factory):
    """(a donor with a 256-id vocabulary and no tokenizer, a donor whose tokenizer.json swaps two token ids)."""
    root = tmp_path_factory.mktemp("odd")
    byte_model = tiny_checkpoint(root / "bytes", vocab_size=256, tokenizer=False)
    swapped = root / "swapped"
    shutil.copytree(donors[1][1], swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    return str(byte_model), str(swapped)


def merge(tmp_path, *donor_dirs, extra=()) -> list:
    return ["upcycle", tmp_path / "moe", "--donors", *donor_dirs, "--no-progress", *extra]


def test_donors_of_other_vocabularies_do_not_merge(donors, odd_donors, tmp_path, capsys):
    code, prose, math = donors[1]
    byte_model, swapped = odd_donors
    err = refused(capsys, *merge(tmp_path, code, byte_model, math), watch=[tmp_path / "moe", byte_model, code])
    assert f"{byte_model}/config.json: vocab_size 256 differs from the base's 320 ({code}); donors must share the " \
           "base's tokenizer" in err
    err = refused(capsys, *merge(tmp_path, code, swapped, math), watch=[tmp_path / "moe", swapped, code])
    assert f"{swapped}/tokenizer.json differs from the base's ({code}/tokenizer.json: its vocabulary); donors must " \
           "share the base's tokenizer, or say to use the base's (tokenizer_source: base in a recipe" in err
    err = refused(capsys, *merge(tmp_path, code, prose, math, extra=["--shared-donor", swapped]),
                  watch=[tmp_path / "moe", swapped])  # the shared expert's donor too
    assert f"{swapped}/tokenizer.json differs from the base's" in err


def test_tokenizer_source_base_merges_donors_of_one_vocab_size(donors, odd_donors, tmp_path, capsys):
    code, prose, math = donors[1]
    byte_model, swapped = odd_donors
    recipe = tmp_path / "merge.yml"
    recipe.write_text(f"base_model: {code}\ngate_mode: random\ntokenizer_source: base\nexperts:\n"
                      f"  - source_model: {code}\n  - source_model: {swapped}\n  - source_model: {math}\n")
    rc, _, err = moekit(capsys, "upcycle", "--config", recipe, tmp_path / "moe", "--no-progress")
    assert rc == 0, err
    record = read_record(tmp_path / "moe")
    assert record["options"]["tokenizer_source"] == "base" and record["verify"]["ok"]
    with open(os.path.join(code, "tokenizer.json"), "rb") as f:
        assert (tmp_path / "moe" / "tokenizer.json").read_bytes() == f.read()  # the base's tokenizer
    recipe.write_text(recipe.read_text().replace(str(swapped), byte_model))
    err = refused(capsys, "upcycle", "--config", recipe, tmp_path / "moe2", "--no-progress",
                  watch=[tmp_path / "moe2", recipe, byte_model])
    assert "vocab_size 256 differs from the base's 320" in err and \
           "tokenizer_source base with donors of another vocab_size is not supported yet" in err
    err = refused(capsys, *merge(tmp_path, code, swapped, math, extra=["--tokenizer-source", "union"]),
                  watch=[tmp_path / "moe", swapped])
    assert "--tokenizer-source 'union' is not supported yet; moekit implements base" in err


def test_a_donors_tokenizer_is_read_only_from_inside_it(donors, tmp_path, capsys):
    code, prose, math = donors[1]
    linked = tmp_path / "linked"
    shutil.copytree(prose, linked)
    os.remove(linked / "tokenizer.json")
    os.symlink(outside_file(tmp_path, "tokenizer.json"), linked / "tokenizer.json")
    err = refused(capsys, *merge(tmp_path, code, linked, math), watch=[tmp_path / "moe", linked])
    assert f"{linked}: tokenizer.json 'tokenizer.json' points outside the checkpoint; refusing to read it" in err
    assert SECRET not in err
