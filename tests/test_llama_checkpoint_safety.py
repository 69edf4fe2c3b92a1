"""llama.checkpoint, hostile input: every command reads a checkpoint through one reader, so each class of bad
directory is refused in one line by every command (params, verify, upcycle, train), with nothing written and the
source untouched; Hugging Face hub cache layouts (symlinks into ../../blobs) keep working."""

import hashlib
import json
import os
import shutil
import struct

import pytest

from moekit.cli import main
from moekit.llama import Llama

from helpers import bpe_tokenizer, one_line_error, sharded_dense

COMMANDS = ("params", "verify", "upcycle", "train")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = sharded_dense(tmp_path_factory.mktemp("src") / "dense", vocab_size=300)
    bpe_tokenizer(path, vocab_size=300)
    return path


def digest(path) -> str:
    """A hash of every file under `path` (names and bytes): the source must come out of a command unchanged."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def run(capsys, command: str, src, tmp_path) -> str:
    """`command` on `src` must fail in one line and write nothing; returns the line."""
    out = tmp_path / "out"
    argv = {"params": ["params", src], "verify": ["verify", src, src, "--no-progress"],
            "upcycle": ["upcycle", src, out, "--no-progress"],
            "train": ["train", src, "--out", out, "--steps", "1", "--no-progress", "--seq-len", "8"]}[command]
    before = digest(src) if os.path.isdir(src) else None
    err = one_line_error(capsys, *argv)
    assert err.startswith(f"moekit {command}: error: "), err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")], os.listdir(tmp_path)
    if before is not None:
        assert digest(src) == before
    return err


def copy_of(dense_dir, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(dense_dir, dst)
    return dst


# ---- weight files and side files outside the checkpoint ----------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how", ["relative", "absolute", "symlinked-shard", "system-file"])
def test_weight_files_outside_the_checkpoint_are_refused(dense_dir, tmp_path, capsys, command, how):
    src = copy_of(dense_dir, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(src.glob("model-*.safetensors"))[0]
    secret = outside / "secret.safetensors"
    shutil.copy(shard, secret)
    if how == "system-file":  # not safetensors at all: its bytes must never be printed
        secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 4)
    if how == "symlinked-shard":
        shard.unlink()
        shard.symlink_to(secret)
    else:
        target = "../elsewhere/secret.safetensors" if how == "relative" else str(secret)
        index["weight_map"] = {k: (target if v == shard.name else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
    err = run(capsys, command, src, tmp_path)
    assert "points outside the checkpoint" in err and "root" not in err.replace(str(tmp_path), ""), err


@pytest.mark.parametrize("command", ["upcycle", "train"])
def test_a_symlinked_side_file_outside_is_not_copied(dense_dir, tmp_path, capsys, command):
    src = copy_of(dense_dir, tmp_path)
    (tmp_path / "private.json").write_bytes((src / "tokenizer.json").read_bytes())  # a valid file, elsewhere
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(tmp_path / "private.json")
    err = run(capsys, command, src, tmp_path)
    assert "'tokenizer.json' points outside the checkpoint" in err, err
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "private.json"]


def hub_cache(dense_dir, tmp_path):
    """A Hugging Face hub cache: snapshots/<rev>/* are symlinks into ../../blobs/<sha>."""
    model = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = model / "blobs", model / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in os.listdir(dense_dir):
        data = (dense_dir / f).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_a_hub_cache_snapshot_upcycles_verifies_counts_and_trains(dense_dir, tmp_path, capsys):
    snap = hub_cache(dense_dir, tmp_path)
    assert main(["params", str(snap), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == Llama.from_pretrained(dense_dir).num_parameters()
    moe = tmp_path / "moe"
    assert main(["upcycle", str(snap), str(moe), "--num-experts", "4", "--no-progress"]) == 0
    assert (moe / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()
    assert not (moe / "tokenizer.json").is_symlink()
    assert main(["verify", str(snap), str(moe), "--no-progress"]) == 0
    assert main(["train", str(snap), "--out", str(tmp_path / "trained"), "--steps", "2", "--seq-len", "8",
                 "--batch-size", "2", "--eval-batches", "1", "--no-progress"]) == 0
    assert (tmp_path / "trained" / "config.json").is_file()


def test_a_link_from_the_snapshot_to_another_models_blobs_is_refused(dense_dir, tmp_path, capsys):
    snap = hub_cache(dense_dir, tmp_path)
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    shard = sorted(snap.glob("model-*.safetensors"))[0]
    (other / "x").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(other / "x")
    assert "points outside the checkpoint" in run(capsys, "params", snap, tmp_path)


# ---- files that are not what they claim ------------------------------------------------------------------

def write_safetensors(path, header, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


MALFORMED = {
    "header a list": ([1, 2], b"", "the header is not a JSON object"),
    "header a number": (42, b"", "the header is not a JSON object"),
    "entry not an object": ({"model.norm.weight": "F32"}, b"", "has no known dtype"),
    "no data_offsets": ({"model.norm.weight": {"dtype": "F32", "shape": [32]}}, b"\0" * 128, "no valid data_offsets"),
    "unknown dtype": ({"model.norm.weight": {"dtype": "F33", "shape": [32], "data_offsets": [0, 128]}}, b"\0" * 128,
                      "has no known dtype"),
    "range too short": ({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 64]}}, b"\0" * 64,
                        "spans 64 bytes; its shape and dtype need 128"),
    "negative shape": ({"model.norm.weight": {"dtype": "F32", "shape": [-32], "data_offsets": [0, 128]}},
                       b"\0" * 128, "no valid shape"),
    "negative offset": ({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [-128, 0]}},
                        b"\0" * 128, "no valid data_offsets"),
    "not JSON": (None, b"", "the header is not JSON"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_headers(dense_dir, tmp_path, capsys, command, case):
    src = copy_of(dense_dir, tmp_path)
    header, data, message = MALFORMED[case]
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    if header is None:
        shard.write_bytes(struct.pack("<Q", 6) + b"{oops!")
    else:
        write_safetensors(shard, header, data)
    err = run(capsys, command, src, tmp_path)
    assert shard.name in err and message in err, err


@pytest.mark.parametrize("command", COMMANDS)
def test_duplicate_tensors_across_files_without_an_index(dense_dir, tmp_path, capsys, command):
    src = tmp_path / "single"
    Llama.from_pretrained(dense_dir).save_pretrained(src)  # one model.safetensors, no index
    shutil.copy(src / "model.safetensors", src / "model_old.safetensors")
    err = run(capsys, command, src, tmp_path)
    assert "is in both model.safetensors and model_old.safetensors" in err, err


CONFIGS = {
    "not UTF-8": (b'{"a": "\xff"}', "not UTF-8"),
    "nested too deeply": (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    "not an object": (b"[1, 2, 3]", "expected a JSON object"),
    "rms_norm_eps a string": ({"rms_norm_eps": "x"}, "'rms_norm_eps' must be a positive finite number"),
    "rope_scaling a list": ({"rope_scaling": [1, 2]}, "'rope_scaling' must be an object or null"),
    "hidden_size huge": ({"hidden_size": 1e400}, "'hidden_size' must be a positive integer"),
    "tie_word_embeddings a number": ({"tie_word_embeddings": 3}, "'tie_word_embeddings' must be true or false"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_json(dense_dir, tmp_path, capsys, command, case):
    src = copy_of(dense_dir, tmp_path)
    change, message = CONFIGS[case]
    if isinstance(change, bytes):
        (src / "config.json").write_bytes(change)
    else:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **change}).replace("Infinity", "1e400"))
    if command == "params" and case in ("rms_norm_eps a string", "rope_scaling a list",
                                        "tie_word_embeddings a number"):
        pytest.skip("params counts shapes; these fields do not change a count")
    err = run(capsys, command, src, tmp_path)
    assert "config.json" in err and message in err, err


@pytest.mark.parametrize("weight_map", [[1, 2], {"model.norm.weight": 5}, "x"])
def test_an_index_that_is_not_a_map_of_names(dense_dir, tmp_path, capsys, weight_map):
    src = copy_of(dense_dir, tmp_path)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for command in COMMANDS:
        assert "not a safetensors index" in run(capsys, command, src, tmp_path)


def test_pickle_beside_no_safetensors_names_what_is_missing(tmp_path, capsys):
    src = sharded_dense(tmp_path / "ckpt", vocab_size=64)
    for f in os.listdir(src):
        if f.endswith((".safetensors", ".json")) and f != "config.json":
            os.remove(src / f)
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    err = one_line_error(capsys, "params", src)
    assert "no *.safetensors weight files (only pickle weights, pytorch_model.bin" in err
