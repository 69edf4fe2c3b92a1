"""llama.io: JSON reading with one-line errors, atomic JSON files and atomic output directories."""

import json
import os

import pytest

from moekit.llama.errors import CheckpointError, ConfigError
from moekit.llama.io import AtomicDir, read_config_json, read_json, write_json, write_json_atomic


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_read_json_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        read_json(path, "config.json")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert read_config_json(tmp_path) == {"a": 1} == read_config_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        read_config_json(tmp_path)
    with pytest.raises(ConfigError, match="config.json not found"):
        read_config_json(tmp_path / "nope")


def test_write_json_atomic_replaces_whole_and_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        write_json_atomic(path, {"b": [1, 2]})
    write_json_atomic(path, {"b": [1, 2]}, force=True)
    assert json.loads(path.read_text()) == {"b": [1, 2]} and os.listdir(path.parent) == ["r.json"]


def test_atomic_dir_appears_only_when_complete(tmp_path):
    dst = tmp_path / "parent" / "out"
    with AtomicDir(dst) as tmp:
        write_json(os.path.join(tmp, "a.json"), {})
        assert not dst.exists() and os.path.basename(tmp).startswith("out.tmp-")
    assert sorted(os.listdir(dst)) == [".moekit", "a.json"]
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        with AtomicDir(dst):
            pass
    with pytest.raises(RuntimeError):
        with AtomicDir(dst, force=True) as tmp:
            write_json(os.path.join(tmp, "b.json"), {})
            raise RuntimeError("fails half way")
    assert sorted(os.listdir(dst)) == [".moekit", "a.json"] and sorted(os.listdir(dst.parent)) == ["out"]  # untouched, no temp
    with AtomicDir(dst, force=True) as tmp:
        write_json(os.path.join(tmp, "b.json"), {})
    assert sorted(os.listdir(dst)) == [".moekit", "b.json"] and sorted(os.listdir(dst.parent)) == ["out"]
