"""upcycle.verify and upcycle.record, hostile and careless upcycling.json files through `moekit verify MOE`: a
malformed record (not an object, `options` not an object, unknown option names, wrong types) is one line naming the
file and the key, its options checked as the command line checks them; recorded prompts of 300k characters are
refused within seconds, and prompts longer than the model's context name the limit; upcycling.json, tokenizer.json
and config.json are read only from inside the checkpoint. Each refusal changes nothing (tests/hostile.py)."""

import json
import os
import shutil

import pytest

from moekit.upcycle import UpcycleOptions, merge_donors

from helpers import donor_prompts, moekit, prompt_flags, single_thread
from hostile import SECRET, outside_file, refused, refused_in_time

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def merged(donors, tmp_path_factory):
    """An MoE merged from the three donors, routers from their prompts."""
    dst = tmp_path_factory.mktemp("merged") / "moe"
    options = UpcycleOptions(donors=donors[1], base=donors[0], router_init="hidden",
                             positive_prompts=prompt_flags(donor_prompts()))
    with single_thread():
        merge_donors(dst, options, progress=False, log=None)
    return dst


def edited(merged, tmp_path, edit) -> str:
    """A copy of `merged` whose upcycling.json is `edit(record)` (a value to write, or a string written as is)."""
    moe = tmp_path / "moe"
    shutil.copytree(merged, moe)
    record = json.loads((moe / "upcycling.json").read_text())
    new = edit(record)
    (moe / "upcycling.json").write_text(new if isinstance(new, str) else json.dumps(new))
    return moe


def with_options(**changes):
    return lambda record: {**record, "options": {**record["options"], **changes}}


def test_a_merged_moe_verifies(merged, capsys):
    rc, out, err = moekit(capsys, "verify", merged, "--no-progress")
    assert rc == 0 and ": OK; first choice on each donor's prompts" in out, (out, err)


@pytest.mark.parametrize("edit, message", [
    (lambda r: [r], "upcycling.json: expected a JSON object"),
    (lambda r: "[" * 100_000, "upcycling.json: JSON nested too deeply"),
    (lambda r: {**r, "options": ["donors"]}, "upcycling.json: options must be a JSON object of option names, got "
                                             "['donors']"),
    (with_options(gate="hidden"), "upcycling.json: unknown key 'gate' in options (expected donors, base"),
    (with_options(**{"\x1b[2J\n": 1}), "upcycling.json: unknown key '\\x1b[2J\\n' in options"),
    (with_options(top_k="two"), "upcycling.json: --top-k must be an integer, got 'two'"),
    (with_options(donors=5), "upcycling.json: --donors must be a non-empty list, got 5"),
    (with_options(positive_prompts=[["0:x"]]), "upcycling.json: positive_prompts in options must be a list of "
                                               "strings or numbers, got [['0:x']]"),
    (with_options(router_init={"a": 1}), "upcycling.json: router_init in options must be one string, number or "
                                         "boolean, got {'a': 1}"),
    (with_options(seed=-1), "upcycling.json: --seed must be"),
    (with_options(donors=None), "upcycling.json: --base is an option of --donors"),
])
def test_a_malformed_record_is_one_line_naming_the_key(merged, tmp_path, capsys, edit, message):
    moe = edited(merged, tmp_path, edit)
    err = refused(capsys, "verify", moe, "--no-progress", watch=[moe])
    assert message in err and len(err) < 1200, err


def test_recorded_prompts_of_300k_characters_are_refused_in_seconds(merged, tmp_path):
    moe = edited(merged, tmp_path, with_options(positive_prompts=["0:" + "x" * 300_000, "1:b", "2:c"]))
    err = refused_in_time("verify", moe, "--no-progress", watch=[moe], timeout=30)
    assert f"{moe}/upcycling.json: --positive-prompts: a prompt of 300,002 characters ('0:xxx" in err
    assert "a prompt holds at most 32,768" in err


def test_recorded_prompts_longer_than_the_context_name_the_limit(merged, tmp_path, capsys):
    moe = edited(merged, tmp_path, with_options(positive_prompts=["0:a", "1:" + "word " * 1000, "2:c"]))
    err = refused(capsys, "verify", moe, "--no-progress", watch=[moe])
    assert "--positive-prompts: prompt 'word word" in err and "of expert 1 is 4,001 tokens" in err
    assert f"tokens with {moe}/tokenizer.json; the model reads at most 256 (its max_position_embeddings)" in err


@pytest.mark.parametrize("name", ["upcycling.json", "tokenizer.json", "config.json"])
def test_files_of_moe_are_read_only_from_inside_it(merged, tmp_path, capsys, name):
    moe = tmp_path / "moe"
    shutil.copytree(merged, moe)
    os.remove(moe / name)
    os.symlink(outside_file(tmp_path), moe / name)
    err = refused(capsys, "verify", moe, "--no-progress", watch=[moe])
    assert f"'{name}' points outside the checkpoint; refusing to read it" in err and SECRET not in err
