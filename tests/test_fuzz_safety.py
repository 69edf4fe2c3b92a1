"""Seeded fuzzing of the files commands read: mutations of config.json, safetensors headers, recipe YAML,
train_config.json and metrics.jsonl, each run through the command line in-process. Every outcome is success or
one line (exit 2), never a traceback, and never a hang (a per-case time limit)."""

import json
import os
import random
import shutil
import signal
import struct

import pytest

from helpers import moekit, sharded_dense
from hostile import check_line

pytestmark = pytest.mark.slow
LIMIT_S = 20  # per case: well above any legitimate run here


class Hang(Exception):
    pass


def run_case(capsys, argv: list, what: str) -> int:
    """`moekit ARGV`: success, or exit 2 with one line; an exception or a hang fails the test, naming the case."""
    def alarm(signum, frame):
        raise Hang(f"{what}: still running after {LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    try:
        rc, out, err = moekit(capsys, *argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert rc in (0, 1, 2), (what, rc, err[-2000:])
    if rc == 2:
        try:
            check_line(err)
        except AssertionError:
            raise AssertionError(f"{what}: {err[-2000:]}") from None
    return rc


# ---- mutations ------------------------------------------------------------------------------------------------

JUNK = [None, True, -1, 0, 2**63, 3.5, -0.0, "", "x" * 5000, "\x1b[31m\n", [], {}, [1, "a"], {"a": {"b": [None]}},
        [[[[[[[[[[1]]]]]]]]]], 1e300, "NaN", "../../etc/passwd"]
RAW = ["1e400", "-1e400", "NaN", "Infinity", "9" * 5000, "[" * 5000 + "]" * 5000, '"\\ud800"', '"\\u0000"']


def mutate_json(rng: random.Random, obj, depth: int = 0):
    """A structurally mutated copy of a JSON value; raw tokens appear as strings '\x00RAW<i>' replaced later."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        obj = dict(obj)
        key = rng.choice(list(obj))
        op = rng.randrange(5)
        if op == 0:
            del obj[key]
        elif op == 1:
            obj[key] = rng.choice(JUNK)
        elif op == 2:
            obj[key] = f"\x00RAW{rng.randrange(len(RAW))}"
        elif op == 3:
            obj[key + "_unknown"] = obj.pop(key)
        else:
            obj[key] = mutate_json(rng, obj[key], depth + 1)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        obj = list(obj)
        i = rng.randrange(len(obj))
        obj[i] = mutate_json(rng, obj[i], depth + 1) if rng.random() < 0.5 else rng.choice(JUNK)
        return obj
    return rng.choice(JUNK) if rng.random() < 0.7 else f"\x00RAW{rng.randrange(len(RAW))}"


def dumps(obj) -> str:
    text = json.dumps(obj)
    for i, raw in enumerate(RAW):
        text = text.replace(f'"\\u0000RAW{i}"', raw)
    return text


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(3)
    if op == 0:
        return data[:rng.randrange(len(data) + 1)]
    pos = rng.randrange(len(data) + 1)
    if op == 1:
        return data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1:]
    return data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + data[pos:]


def mutated_text(rng: random.Random, text: str) -> bytes:
    """Half the time a JSON-level mutation of `text` (a JSON document), else a byte-level one."""
    if rng.random() < 0.6:
        return dumps(mutate_json(rng, json.loads(text))).encode()
    return mutate_bytes(rng, text.encode())


# ---- the cases ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return sharded_dense(tmp_path_factory.mktemp("fuzz") / "dense", vocab_size=64)


def test_config_json(dense, tmp_path, capsys):
    rng, text = random.Random(1), (dense / "config.json").read_text()
    for case in range(80):
        ckpt = tmp_path / f"c{case}"
        shutil.copytree(dense, ckpt)
        (ckpt / "config.json").write_bytes(mutated_text(rng, text))
        command = ["params", ckpt] if case % 4 else ["verify", dense, ckpt, "--no-progress"]
        run_case(capsys, command, f"config.json case {case}")
        shutil.rmtree(ckpt)


def test_safetensors_headers(dense, tmp_path, capsys):
    rng = random.Random(2)
    shard = sorted(f for f in os.listdir(dense) if f.endswith(".safetensors"))[0]
    data = (dense / shard).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode()
    for case in range(60):
        ckpt = tmp_path / f"s{case}"
        shutil.copytree(dense, ckpt)
        if case % 3:
            new = mutated_text(rng, header)
            body = struct.pack("<Q", len(new)) + new + data[8 + n:]
        else:
            body = mutate_bytes(rng, data[:64]) + data[64:]  # the length field and the header's start
        (ckpt / shard).write_bytes(body)
        run_case(capsys, ["params", ckpt] if case % 2 else ["upcycle", ckpt, tmp_path / f"o{case}", "--num-experts",
                                                              "2", "--no-progress"], f"safetensors case {case}")
        shutil.rmtree(ckpt)
        shutil.rmtree(tmp_path / f"o{case}", ignore_errors=True)


RECIPE = """\
base_model: {base}
gate_mode: random
dtype: float32
experts:
  - source_model: {a}
    positive_prompts: ["def f(x):"]
  - source_model: {b}
    positive_prompts: ["Once upon a time"]
"""


def test_recipe_yaml(dense, tmp_path, capsys):
    import yaml

    rng = random.Random(3)
    b = shutil.copytree(dense, tmp_path / "b")
    recipe = yaml.safe_load(RECIPE.format(base=dense, a=dense, b=b))
    for case in range(40):
        path = tmp_path / f"r{case}.yml"
        if case % 4 == 0:
            path.write_bytes(mutate_bytes(rng, RECIPE.format(base=dense, a=dense, b=b).encode()))
        else:
            path.write_text(dumps(mutate_json(rng, recipe)))  # JSON is YAML too
        run_case(capsys, ["upcycle", "--config", path, tmp_path / f"m{case}", "--no-progress"], f"recipe case {case}")
        shutil.rmtree(tmp_path / f"m{case}", ignore_errors=True)


TRAIN = ["--steps", "2", "--save-every", "1", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1",
         "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, capsys_module=None):
    """OUT.partial of a run killed after its first saved state (the second step raises)."""
    root = tmp_path_factory.mktemp("run")
    from moekit.cli import main

    assert main(["train", "tiny", "--out", str(root / "run"), *TRAIN]) == 0
    shutil.copytree(root / "run", root / "run.partial")  # a finished run's files, as a partial run holds them
    return root / "run.partial"


def test_train_config_json(interrupted_run, tmp_path, capsys):
    rng = random.Random(4)
    text = (interrupted_run / "train_config.json").read_text()
    for case in range(30):
        run = tmp_path / f"t{case}.partial"
        shutil.copytree(interrupted_run, run)
        (run / "train_config.json").write_bytes(mutated_text(rng, text))
        run_case(capsys, ["train", "--resume", "--out", tmp_path / f"t{case}", "--no-progress"],
                 f"train_config.json case {case}")


def test_metrics_jsonl(interrupted_run, tmp_path, capsys):
    rng = random.Random(5)
    lines = (interrupted_run / "metrics.jsonl").read_text().splitlines()
    for case in range(30):
        run = tmp_path / f"p{case}"
        run.mkdir()
        shutil.copy(interrupted_run / "train_config.json", run)
        i = rng.randrange(len(lines))
        text = "\n".join(lines[:i] + [mutated_text(rng, lines[i]).decode("utf-8", "replace")] + lines[i + 1:]) + "\n"
        (run / "metrics.jsonl").write_text(text, encoding="utf-8", errors="surrogateescape")
        run_case(capsys, ["plot", run, "--out", tmp_path / f"plots{case}"], f"metrics.jsonl case {case}")
