"""moekit.cli: every subcommand's flags come from its options dataclass, --help imports no torch, and every error a
user can cause (bad flags, bad values, moekit's own errors, the file system) is one line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import COMMANDS, main
from moekit.llama.errors import ConfigError
from moekit.llama.options import declared_fields, flag_name

from helpers import moekit, one_line_error

ROOT = Path(__file__).resolve().parents[1]


def commands():
    for c in COMMANDS:
        for leaf in c.subcommands or (c,):
            yield ([c.name, leaf.name] if c.subcommands else [c.name]), leaf


@pytest.mark.parametrize("argv", [[]] + [argv for argv, _ in commands()], ids=lambda a: " ".join(a) or "moekit")
def test_help_imports_no_torch_numpy_or_matplotlib(argv):
    code = ("import sys\nfrom moekit.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\nprint(*(m in sys.modules for m in ('torch', 'numpy', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False False", out.stdout[-500:]


@pytest.mark.parametrize("argv, command", list(commands()), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_every_declared_option_is_a_flag_with_its_default(argv, command, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for cls in (command.options, *command.extra):
        for f, *_ in declared_fields(cls):
            if f.metadata.get("positional"):
                assert f.metadata["metavar"] in text
                continue
            assert flag_name(f) in text, (argv, f.name)


@pytest.mark.parametrize("argv, words", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "tiny"], "the following arguments are required: --out"),
    (["train", "tiny", "--out", "x", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["params", "7B", "--zero", "5"], "argument --zero: invalid choice: 5"),
    (["bench", "gemm", "--passes", "sideways"], "argument --passes: invalid choice: 'sideways'"),
])
def test_usage_errors_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["upcycle", "only-dst"], "SRC is missing: moekit upcycle SRC only-dst, or only-dst --donors A B C"),
    (["upcycle", "--donors", "a", "b", "out"], "DST is missing: moekit upcycle SRC DST, or DST --donors A B C"),
    (["upcycle", "src", "out", "--donors", "a", "b"], "SRC src given with --donors: the base is --base"),
    (["verify"], "MOE is missing: moekit verify DENSE MOE, or moekit verify MOE"),
])
def test_missing_paths_are_one_line(argv, words, capsys):
    assert words in one_line_error(capsys, *argv)


@pytest.mark.parametrize("argv, words", [
    (["train", "tiny", "--out", "x", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["train", "tiny", "--out", "x", "--seed", "-1"], "--seed must be in [0, 9223372036854775807], got -1"),
    (["upcycle", "a", "b", "--noise-scale", "inf"], "--noise-scale must be a finite number, got inf"),
    (["upcycle", "a", "b", "--max-shard-size", "1.2.3GB"], "cannot read size '1.2.3GB'"),
    (["verify", "a", "b", "--tokens", "0"], "--tokens must be in [1, 65536], got 0"),
    (["verify", "a", "b", "--atol", "nan"], "--atol must be a finite number, got nan"),
    (["params", "7B", "--price-per-gpu-hour", "inf"], "--price-per-gpu-hour must be a finite number"),
    (["params", "7B", "--shard-degree", "-2"], "--shard-degree must be >= 1, got -2"),
    (["params", "7B", "--tokens", "1T", "--train-flops", "1e20"], "--tokens or --train-flops, not both"),
    (["bench", "gemm", "--tokens", "-1"], "--tokens must be in [1, 2147483648], got -1"),
])
def test_bad_values_are_one_line(argv, words, capsys):
    err = one_line_error(capsys, *argv)
    assert err.startswith(f"moekit {argv[0]}") and words in err, err


def test_moekit_errors_and_debug(capsys, tmp_path):
    err = one_line_error(capsys, "params", tmp_path / "nope.json")
    assert err.startswith("moekit params: error: ") and "nope.json" in err
    with pytest.raises(ConfigError):
        main(["--debug", "params", str(tmp_path / "nope.json")])


def test_version_and_bare_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("moekit ")
    rc, out, _ = moekit(capsys)
    assert rc == 0 and "upcycle" in out and "params" in out
