"""The wheel: built from the repository and installed (not editable) into a fresh virtual environment, moekit runs
from outside the repository with nothing but what the wheel holds. Its one top-level import name is `moekit`, so
it installs beside Hugging Face's `kernels` (which transformers probes for) and PyPI's `llama` and `moe`."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow
OUR_FOLDERS = ("llama", "moe", "upcycle", "kernels")  # the repository's folders: moekit.llama, ...


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source tree (so no build/ left over from an earlier build slips in)."""
    tree, out = tmp_path_factory.mktemp("tree") / "moekit", tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                              "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(tree)], check=True, capture_output=True, timeout=300)
    return next(out.glob("moekit-*.whl"))


def pip(venv: Path, *args) -> subprocess.CompletedProcess:
    """pip of this environment acting on `venv` (which has no pip of its own)."""
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=600)


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A new virtual environment with the moekit wheel installed in it. The packages moekit needs (torch, ...) come
    from this environment's site-packages through a .pth line written after the install, so pip never sees this
    environment's editable moekit; a path reached through a .pth line has its own .pth files ignored, so that
    editable install's import hook stays out too."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    done = pip(venv, "--no-deps", "--no-index", str(wheel))
    assert done.returncode == 0, done.stderr
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run(venv: Path, cwd: Path, *argv, check: bool = True) -> str:
    """A command of `venv/bin` run in `cwd` (outside the repository), offline, with its caches in `cwd`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(XDG_CACHE_HOME=str(cwd / "cache"), HF_HOME=str(cwd / "hf"), HF_HUB_OFFLINE="1")
    p = subprocess.run([str(venv / "bin" / argv[0]), *map(str, argv[1:])], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert not check or p.returncode == 0, f"{argv}: {p.stdout[-1500:]}{p.stderr[-3000:]}"
    return p.stdout


def test_the_wheel_holds_only_moekit(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
        top_level = next(z.read(n).decode() for n in names if n.endswith(".dist-info/top_level.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert top == {"moekit"} and top_level.split() == ["moekit"]
    assert "moekit/py.typed" in names and "moekit/llama/model.py" in names and "moekit/moe/train/loop.py" in names
    assert not any(n.startswith(("tests/", "scripts/", "docs/")) for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(name in line for line in requires for name in ("pytest", "transformers", "ruff", "matplotlib"))
    extras = {line.split(": ")[1] for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert {"triton", "megablocks", "plot", "trackers", "datasets"} <= extras


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(a fresh venv with the wheel installed, an empty working directory outside the repository)."""
    root = tmp_path_factory.mktemp("installed")
    (root / "work").mkdir()
    return fresh_venv(root, wheel), root / "work"


def upcycled(venv: Path, work: Path) -> None:
    """work/dense (a tiny Llama trained 2 steps) and work/moe (it upcycled to 4 experts), once."""
    if not (work / "moe").is_dir():
        run(venv, work, "moekit", "train", "tiny", "--steps", "2", "--out", "dense", "--no-progress")
        run(venv, work, "moekit", "upcycle", "dense", "moe", "--num-experts", "4", "--no-progress")


def test_the_installed_wheel_runs_from_outside_the_repository(installed):
    venv, work = installed
    assert "upcycle" in run(venv, work, "moekit", "--help") and "params" in run(venv, work, "python", "-m", "moekit")
    assert run(venv, work, "moekit", "--version").strip() == "moekit 0.1.0"
    where = run(venv, work, "python", "-c", "import importlib.util as u, moekit.llama, moekit.upcycle.convert\n"
                f"print(moekit.llama.__file__, [u.find_spec(n) for n in {OUR_FOLDERS!r}])")
    assert where.startswith(str(venv)) and where.strip().endswith("[None, None, None, None]"), where
    run(venv, work, "moekit", "train", "tiny-moe", "--steps", "2", "--out", "moe-run", "--no-progress")
    assert {"config.json", "model.safetensors", "metrics.jsonl"} <= set(os.listdir(work / "moe-run"))
    assert "46,702,792,704 parameters" in run(venv, work, "moekit", "params", "mixtral-8x7b")
    upcycled(venv, work)
    assert "OK" in run(venv, work, "moekit", "verify", "dense", "moe", "--no-progress")


def test_moekit_lives_beside_hugging_faces_kernels(installed):
    from transformers.utils import import_utils

    venv, work = installed
    done = pip(venv, "--no-deps", f"kernels<{import_utils.KERNELS_MAX_VERSION}")
    if done.returncode != 0:
        pytest.skip(f"the package registry refused `pip install kernels`: {done.stderr.strip().splitlines()[-1:]}")
    probe = json.loads(run(venv, work, "python", "-c", "import json, importlib.metadata as m, kernels\n"
                           "from transformers.utils.import_utils import is_kernels_available as ok\n"
                           "v = m.version('kernels')\n"
                           "print(json.dumps([kernels.__file__, hasattr(kernels, 'get_kernel'), v, ok(), "
                           "ok(MIN_VERSION=v)]))"))
    file, theirs, version, available, available_at_its_version = probe
    assert Path(file).is_relative_to(venv) and theirs, probe  # Hugging Face's, installed in the venv
    # transformers accepts the kernel hub from KERNELS_MIN_VERSION on; the registry may offer only older releases
    in_window = _version(import_utils.KERNELS_MIN_VERSION) <= _version(version)
    assert available == in_window and available_at_its_version, probe

    upcycled(venv, work)  # upcycle -> train -> params with their kernels installed
    run(venv, work, "moekit", "train", "moe", "--steps", "2", "--out", "moe-trained", "--no-progress")
    counts = json.loads(run(venv, work, "moekit", "params", "moe-trained", "--json"))
    assert counts["model_type"] == "mixtral" and counts["active_params"] < counts["total_params"]
    same = run(venv, work, "python", "-c", "import torch, transformers\n"
               "from moekit.moe import MoEForCausalLM\n"
               "ids = torch.arange(1, 20)[None]\n"
               "ours = MoEForCausalLM.from_pretrained('moe-trained').eval()(ids).logits\n"
               "hf = transformers.AutoModelForCausalLM.from_pretrained('moe-trained').eval()(input_ids=ids).logits\n"
               "print((ours - hf).abs().max().item())")
    assert float(same) <= 1e-5


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())
