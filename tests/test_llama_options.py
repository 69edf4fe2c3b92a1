"""llama.options: option declarations, the checks they drive (types, finite numbers, ranges, choices) and the
number and size parsers."""

import math
from dataclasses import dataclass

import pytest

from moekit.llama.errors import ConfigError
from moekit.llama.options import check_options, field_kind, flag_name, option, parse_number, parse_size


@dataclass
class Example:
    steps: int = option(10, "steps", min=1)
    lr: float = option(1e-3, "learning rate", gt=0, max=1)
    rate: float | None = option(None, "a rate", min=0)
    names: list[str] = option(default_factory=lambda: ["a"], help="names", choices=("a", "b"))
    progress: bool = option(True, "no progress bar")
    atol: float = option(1e-4, "tolerance", flag="--tol", min=0)
    internal: int = 3  # not an option: not checked

    def __post_init__(self):
        check_options(self)


@pytest.mark.parametrize("kw, message", [
    (dict(steps=0), "--steps must be >= 1, got 0"),
    (dict(steps=2.5), "--steps must be an integer, got 2.5"),
    (dict(steps=True), "--steps must be an integer, got True"),
    (dict(lr=0.0), r"--lr must be in \(0, 1\], got 0"),
    (dict(lr=1e30), r"--lr must be in \(0, 1\], got 1e\+30"),
    (dict(lr=math.nan), "--lr must be a finite number, got nan"),
    (dict(lr=math.inf), "--lr must be a finite number, got inf"),
    (dict(lr="x"), "--lr must be a number, got 'x'"),
    (dict(rate=-1.0), "--rate must be >= 0, got -1"),
    (dict(names=["c"]), "--names 'c' is not one of a, b"),
    (dict(names=[]), "--names must be a non-empty list"),
    (dict(progress="yes"), "--progress must be true or false"),
    (dict(atol=-1.0), "--tol must be >= 0"),
])
def test_checks_refuse_bad_values_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        Example(**kw)


def test_good_values_pass_and_declarations_read_back():
    e = Example(steps=3, lr=1.0, rate=None, names=["a", "b"], progress=False, internal=-5)
    assert (e.steps, e.lr, e.names, e.internal) == (3, 1.0, ["a", "b"], -5)
    assert field_kind(int | None) == (int, True, False) and field_kind(list[str]) == (str, False, True)
    assert field_kind(str | list[int]) == (None, False, False)
    fields = {f.name: f for f in Example.__dataclass_fields__.values()}
    assert flag_name(fields["progress"]) == "--no-progress" and flag_name(fields["atol"]) == "--tol"
    assert flag_name(fields["steps"]) == "--steps"


def test_parse_number():
    assert parse_number("7B") == 7e9 and parse_number("60e12") == 60e12 and parse_number("1.5T") == 1.5e12
    assert parse_number("300b") == 3e11 and parse_number(5) == 5.0
    for bad in ("seven", "1.2.3", "", "-5B"):
        with pytest.raises(ValueError):
            parse_number(bad)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    assert parse_size("500MB") == 500 * 10**6 and parse_size("10KB") == 10_000 and parse_size("1.5MB") == 1_500_000
    for bad in ("lots", "1.2.3GB", "0", "-5MB", 0, -3, True, "GB"):
        with pytest.raises(ConfigError, match="cannot read size"):
            parse_size(bad)
