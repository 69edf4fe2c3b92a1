"""moekit.args: flags built from a dataclass's declarations parse back into the same dataclass."""

from dataclasses import dataclass
from typing import Literal

import pytest

from moekit.args import Parser, add_options, options_from
from moekit.llama.errors import ConfigError
from moekit.llama.options import check_options, option, parse_number


@dataclass
class Options:
    model: str = option("m", "the model", metavar="MODEL", positional=True)
    out: str | None = option(None, "where", metavar="DIR", required=True)
    steps: int = option(10, "steps", metavar="N", min=1)
    rate: float | None = option(None, "a rate", parse=parse_number, gt=0)
    tokens: list[int] = option(default_factory=lambda: [4, 8], help="token counts", metavar="T", min=1)
    mode: Literal["a", "b"] = option("a", "mode")
    force: bool = option(False, "overwrite")
    verify: bool = option(True, "skip the check")
    atol: float = option(1e-4, "tolerance", flag="--tol")
    secret: int = option(0, "python only", cli=False)

    def __post_init__(self):
        check_options(self)


def parse(*argv) -> Options:
    return options_from(Options, add_options(Parser(prog="t"), Options).parse_args(list(argv)))


def test_defaults_round_trip():
    assert parse("mdl", "--out", "o") == Options(model="mdl", out="o")


def test_every_kind_of_flag():
    o = parse("mdl", "--out", "o", "--steps", "3", "--rate", "7B", "--tokens", "1", "2", "3", "--mode", "b",
              "--force", "--no-verify", "--tol", "0.5")
    assert o == Options("mdl", "o", 3, 7e9, [1, 2, 3], "b", True, False, 0.5)


def test_help_shows_defaults_and_hides_python_only_options(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps N steps (default: 10)" in text and "--tokens T [T ...] token counts (default: 4 8)" in text
    assert "--no-verify skip the check" in text and "--secret" not in text and "MODEL the model" in text


def test_bad_values_fail_in_the_dataclass_and_usage_errors_in_one_line(capsys):
    with pytest.raises(ConfigError, match="--steps must be >= 1, got 0"):
        parse("m", "--out", "o", "--steps", "0")
    with pytest.raises(SystemExit):
        parse("m", "--out", "o", "--mode", "c")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'c'" in err and "(see t --help)" in err


@dataclass
class ListOptions:
    runs: list[str] = option(help="runs", metavar="RUN", positional=True)
    out: str | None = option(None, "where", metavar="DIR")

    def __post_init__(self):
        check_options(self)


def test_a_positional_list_takes_one_or_more_values(capsys):
    parser = add_options(Parser(prog="t"), ListOptions)
    assert options_from(ListOptions, parser.parse_args(["a", "b", "--out", "o"])) == ListOptions(["a", "b"], "o")
    assert options_from(ListOptions, parser.parse_args(["a"])).runs == ["a"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o"])
    assert "the following arguments are required: RUN" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="RUN must be a non-empty list"):
        ListOptions([])
