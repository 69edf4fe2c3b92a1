"""upcycle.convert, hostile and careless sources and options through `moekit upcycle SRC DST`: --noise-scale is
bounded and no expert with a non-finite value is ever written; upcycling.json records the source's final learning
rate only when its train_config.json gives a sane one, and the source's training-run files are not copied; every
file read from SRC (config.json, train_config.json, side files) resolves inside it. Each refusal changes nothing
(tests/hostile.py)."""

import json
import math
import os
import shutil

import pytest
import torch

from moekit.llama import Llama, LlamaConfig
from moekit.llama.checkpoint import CheckpointReader
from moekit.upcycle import read_record
from moekit.upcycle.record import source_final_lr

from helpers import moekit, sharded_dense
from hostile import SECRET, outside_file, refused

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--num-experts", "2", "--no-progress"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return sharded_dense(tmp_path_factory.mktemp("src") / "dense", vocab_size=300)


@pytest.fixture(scope="module")
def infinite(tmp_path_factory):
    """A dense checkpoint with one inf in layer 1's up_proj."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.inf
    path = tmp_path_factory.mktemp("inf") / "dense"
    model.save_pretrained(path)
    return path


def copy_with(src, dst, name: str, content=None, link: str | None = None):
    shutil.copytree(src, dst)
    if link:
        os.symlink(link, dst / name)
    else:
        (dst / name).write_text(json.dumps(content))
    return dst


def test_noise_scale_is_bounded(dense, tmp_path, capsys):
    for scale in ("1e308", "11"):  # the example, and just past the bound
        err = refused(capsys, "upcycle", dense, tmp_path / "moe", "--recipe", "noise", "--noise-scale", scale, *FAST,
                      watch=[dense, tmp_path / "moe"])
        assert f"--noise-scale must be in [0, 10], got {float(scale):g}" in err
    rc, _, err = moekit(capsys, "upcycle", dense, tmp_path / "moe", "--recipe", "noise", "--noise-scale", "10", *FAST)
    assert rc == 0, err
    with CheckpointReader(tmp_path / "moe") as r:
        assert all(torch.isfinite(r.get(n)).all() for n in r.names() if "experts" in n)


@pytest.mark.parametrize("recipe", [["--recipe", "noise"], ["--recipe", "drop"], ["--recipe", "copy", "--no-verify"]])
def test_no_expert_with_a_non_finite_value_is_written(infinite, tmp_path, capsys, recipe):
    err = refused(capsys, "upcycle", infinite, tmp_path / "moe", *recipe, *FAST, watch=[infinite, tmp_path / "moe"])
    assert "of layer 1 (" in err and f"_proj, float32) would hold non-finite values: --recipe {recipe[1]}" in err
    assert f"on {infinite}'s 'model.layers.1.mlp." in err and "nothing written" in err


@pytest.mark.parametrize("final_lr, recorded", [(3e-4, 3e-4), (1e30, None)])
def test_the_sources_final_lr_is_recorded_only_when_sane(dense, tmp_path, capsys, final_lr, recorded):
    src = copy_with(dense, tmp_path / "src", "train_config.json", {"schedule": {"final_lr": final_lr}})
    (src / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    rc, _, err = moekit(capsys, "upcycle", src, tmp_path / "moe", *FAST)
    assert rc == 0, err
    assert read_record(tmp_path / "moe")["source_final_lr"] == recorded
    assert not {"train_config.json", "metrics.jsonl"} & set(os.listdir(tmp_path / "moe"))  # not the MoE's own run


@pytest.mark.parametrize("content", [{"schedule": {"final_lr": v}} for v in (-1, 0, 2, "0.1", True, None, math.nan,
                                                                              math.inf, 10 ** 400)]
                         + [{"schedule": [1e-4]}, [1e-4], "x", {}])
def test_odd_train_configs_give_no_final_lr(tmp_path, content):
    (tmp_path / "train_config.json").write_text(json.dumps(content))
    assert source_final_lr(str(tmp_path)) is None
    (tmp_path / "train_config.json").write_text("{not json")
    assert source_final_lr(str(tmp_path)) is None


@pytest.mark.parametrize("name", ["train_config.json", "config.json", "tokenizer_config.json"])
def test_files_of_src_are_read_only_from_inside_it(dense, tmp_path, capsys, name):
    secret = outside_file(tmp_path)  # holds final_lr 1e30 too
    src = tmp_path / "src"
    shutil.copytree(dense, src)
    if name == "config.json":
        os.remove(src / name)
    os.symlink(secret, src / name)
    err = refused(capsys, "upcycle", src, tmp_path / "moe", *FAST, watch=[src, tmp_path / "moe", secret])
    assert f"'{name}' points outside the checkpoint; refusing to read it" in err and SECRET not in err
