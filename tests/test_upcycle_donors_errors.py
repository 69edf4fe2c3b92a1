"""Bad input to `moekit upcycle --donors` / `--config`: one line naming the donor, field or key, exit code 2, and
nothing written (no DST, no temporary directory)."""

import json
import os
import shutil

import pytest
import torch

from moekit.llama import Llama
from moekit.llama.errors import ConfigError
from moekit.upcycle import UpcycleOptions, upcycle_model

from helpers import moekit, one_line_error, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def left_behind(dst) -> list[str]:
    return [n for n in os.listdir(os.path.dirname(dst)) if n.startswith(os.path.basename(dst))]


def refused(capsys, tmp_path, *argv) -> str:
    dst = tmp_path / "out" / "moe"
    err = one_line_error(capsys, "upcycle", dst, *argv, "--no-progress")
    assert err.startswith("moekit upcycle: error: ") and not os.path.exists(dst)
    assert not os.path.exists(dst.parent) or left_behind(str(dst)) == []
    return err


def edited_copy(src, dst, **fields):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **fields}))
    return dst


def test_donors_of_another_architecture_or_shape(donors, tmp_path, capsys):
    base, paths = donors
    mistral = edited_copy(paths[1], tmp_path / "mistral", model_type="mistral")
    err = refused(capsys, tmp_path, "--donors", paths[0], mistral, paths[2])
    assert f"{mistral}/config.json: model_type 'mistral' differs from the base's 'llama' ({paths[0]})" in err
    torch.manual_seed(0)
    wide = tmp_path / "wide"
    Llama(tiny_llama(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=2)).save_pretrained(wide)
    err = refused(capsys, tmp_path, "--donors", *paths, wide, "--num-experts", "4", "--base", base)
    assert f"{wide}/config.json: intermediate_size 96 differs from the base's 128 ({base})" in err
    biased = edited_copy(paths[2], tmp_path / "biased", mlp_bias=True)  # same weight shapes, another FFN
    assert "mlp_bias True differs from the base's False" in refused(capsys, tmp_path, "--donors", *paths[:2], biased)
    assert "--base /nowhere: checkpoint directory not found (donors are local" in refused(
        capsys, tmp_path, "--donors", *paths, "--base", "/nowhere")


@pytest.mark.parametrize("init", ["hidden", "cheap-embed", "hidden-mean"])
def test_an_expert_without_prompts(donors, tmp_path, capsys, init):
    _, paths = donors
    err = refused(capsys, tmp_path, "--donors", *paths, "--router-init", init, "--positive-prompts", "0:def f(x):",
                  "2:1 + 1 = 2")
    assert f"--router-init {init}: expert 1 (donor {paths[1]}) has no positive prompts; give them as " \
           "--positive-prompts '1:TEXT'" in err
    assert "--positive-prompts: expert '3' does not exist; expected I with I in 0..2" in refused(
        capsys, tmp_path, "--donors", *paths, "--router-init", init, "--positive-prompts", "0:a", "1:b", "2:c", "3:d")
    if init == "hidden-mean":  # moekit's: BOS is not a prompt's own token (mergekit's count it)
        assert "expert 2's prompts have no tokens of their own" in refused(
            capsys, tmp_path, "--donors", *paths, "--router-init", init, "--positive-prompts", "0:a", "1:b", "2:")


def test_more_donors_than_experts_and_options_that_need_donors(donors, tmp_path, capsys):
    base, paths = donors
    assert "3 donors but --num-experts 2: every donor needs at least one expert" in refused(
        capsys, tmp_path, "--donors", *paths, "--num-experts", "2", "--top-k", "1")
    assert "--num-experts 4 is not a multiple of the 3 donors" in refused(capsys, tmp_path, "--donors", *paths,
                                                                          "--num-experts", "4")
    assert "--recipe granular cuts one dense FFN into shards" in refused(capsys, tmp_path, "--donors", *paths,
                                                                         "--recipe", "granular")
    assert "--router-init hidden is an option of --donors" in refused(capsys, tmp_path, "--router-init", "hidden")
    assert "--base is an option of --donors" in refused(capsys, tmp_path, "--base", base)
    assert "prompts are read by --router-init hidden, hidden-avg, cheap-embed, hidden-mean, embed-mean, not " \
           "'normal'" in refused(
        capsys, tmp_path, "--donors", *paths, "--positive-prompts", "0:x")
    assert f"SRC {base} given with --donors" in one_line_error(capsys, "upcycle", base, tmp_path / "x", "--donors",
                                                               *paths)
    with pytest.raises(ConfigError, match="upcycle_model upcycles one live model"):
        upcycle_model(Llama(tiny_llama()), UpcycleOptions(donors=paths))
    no_tokenizer = tmp_path / "bare"
    shutil.copytree(base, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert f"{no_tokenizer}: no tokenizer.json; --router-init hidden reads the prompts with the base's tokenizer" in \
        refused(capsys, tmp_path, "--donors", *paths, "--base", no_tokenizer, "--router-init", "hidden",
                "--positive-prompts", "0:a", "1:b", "2:c")


@pytest.mark.parametrize("recipe, message", [
    ("base_model: B\nmerge_method: slerp\nexperts:\n  - source_model: A\n",
     "unknown key 'merge_method' in the recipe (expected base_model, experts, gate_mode"),
    ("base_model: B\nexperts:\n  - source_model: A\n    noise_scale: 0.1\n    weight: 2\n",
     "unknown key 'weight' in experts[0] (expected source_model, positive_prompts, negative_prompts, noise_scale, "
     "residual_scale)"),
    ("base_model: B\ngate_mode: mean\nexperts:\n  - source_model: A\n",
     "gate_mode 'mean' is not one of mergekit-moe's gate modes: hidden, hidden_last, hidden_avg, cheap_embed, "
     "random, uniform_random"),
    ("base_model: B\nexperts:\n  - source_model: A\n    positive_prompts: hello\n",
     "experts[0].positive_prompts must be a list of strings"),
    ("donors: [A, B]\nrouter: hidden\n", "unknown key 'router' in the recipe (expected donors, base"),
    ("base_model: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of keys"),
])
def test_bad_recipe_files(tmp_path, capsys, recipe, message):
    (tmp_path / "merge.yml").write_text(recipe)
    err = refused(capsys, tmp_path, "--config", tmp_path / "merge.yml")
    assert f"{tmp_path / 'merge.yml'}: " in err and message in err, err


def test_a_recipe_whose_donors_are_not_on_disk(tmp_path, capsys):
    (tmp_path / "merge.yml").write_text("base_model: mistralai/Mistral-7B-v0.1\ngate_mode: random\nexperts:\n"
                                        "  - source_model: a/b\n  - source_model: c/d\n")
    err = refused(capsys, tmp_path, "--config", tmp_path / "merge.yml")
    assert f"--base {os.path.abspath('mistralai/Mistral-7B-v0.1')}: checkpoint directory not found" in err


def test_mergekits_guards_name_their_override(donors, tmp_path, capsys):
    base, paths = donors
    err = refused(capsys, tmp_path, "--donors", paths[0], paths[0], paths[0])
    assert f"every donor is {paths[0]}: the MoE would compute what that one model does, at more cost; give donors " \
           "that differ, or --i-understand-this-is-not-useful-without-training to train it on" in err
    err = refused(capsys, tmp_path, "--donors", *paths, "--router-init", "hidden", "--positive-prompts", "0:a", "1:a",
                  "2:a", "--negative-prompts", "0:b", "1:b", "2:b")
    assert "every expert has the same positive and negative prompts, so their routers would be the same row; give " \
           "each expert prompts of its own, or --router-init random" in err
    (tmp_path / "same.yml").write_text(f"base_model: {base}\nexperts:\n" + "".join(
        f"  - source_model: {paths[0]}\n    positive_prompts: [p{i}]\n" for i in range(2)))
    assert "--i-understand-this-is-not-useful-without-training" in refused(capsys, tmp_path, "--config",
                                                                           tmp_path / "same.yml")
    assert "--expert-noise: expert '5' does not exist; expected I with I in 0..2" in refused(
        capsys, tmp_path, "--donors", *paths, "--expert-noise", "5:0.1")
    assert "--residual-scale '0:inf': expected I:X, I the expert's index or 'shared' and X a finite factor" in refused(
        capsys, tmp_path, "--donors", *paths, "--residual-scale", "0:inf")


def test_the_override_merges_one_model_into_copies_it_trains_from(donors, tmp_path, capsys):
    base, paths = donors
    dst = tmp_path / "moe"
    code, out, err = moekit(capsys, "upcycle", dst, "--donors", paths[0], paths[0], "--no-progress",
                            "--i-understand-this-is-not-useful-without-training")
    assert code == 0 and "merged 2 donors" in out, err


def test_warnings_for_degenerate_routers_and_donors_never_chosen():
    from moekit.upcycle.convert import Layout
    from moekit.upcycle.donors import routing_warnings

    options = UpcycleOptions(donors=["a", "b"], router_init="hidden", positive_prompts=["0:x", "1:y"])
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.999, 0.04, 0.0]])  # condition number ~50: mergekit warns above 5
    layout = Layout([0, 1], routers={0: rows, 1: torch.eye(2, 3)})
    warned = routing_warnings(layout, options, {"verify": {"routing": {"0": 0.75, "1": 0.0}}})
    assert warned == [
        "the routers of 1 layer(s) (0) are nearly degenerate: the prompts may be too similar, and some experts will be "
        "underused",
        "donor(s) 1 never get the first choice on their own prompts (shares 0: 75%, 1: 0%): their experts may go "
        "unused"]
    assert routing_warnings(Layout([0, 1], routers={1: torch.eye(2, 3)}), options, {"verify": None}) == []
