"""llama.options: option declarations, the checks they drive (types, finite numbers, ranges, choices) and the
number and size parsers."""

import math
from dataclasses import dataclass
from typing import Literal

import pytest

from moekit.llama.errors import ConfigError
from moekit.llama.options import (
    check_config_fields,
    check_options,
    choices_of,
    field_kind,
    flag_name,
    option,
    parse_number,
    parse_size,
)


@dataclass
class Example:
    steps: int = option(10, "steps", min=1)
    lr: float = option(1e-3, "learning rate", gt=0, max=1)
    rate: float | None = option(None, "a rate", min=0)
    names: list[Literal["a", "b"]] = option(default_factory=lambda: ["a"], help="names")
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


def test_choices_come_from_literal_types():
    assert choices_of(Literal["a", "b"]) == ("a", "b") and choices_of(list[Literal[1, 2]] | None) == (1, 2)
    assert choices_of(str) is None and choices_of(int | None) is None
    assert field_kind(Literal["a", "b"] | None) == (str, True, False) and field_kind(list[Literal[0, 1]]) == (int, False, True)


@dataclass
class Config:
    width: int = option(8, "width", min=1)
    layers: list[int] = option(default_factory=list, help="layer indices", min=0)
    eps: float = option(1e-6, "epsilon", gt=0)
    noise: float = option(0.0, "noise", min=0, lt=1)
    factor: float | None = option(None, "factor", gt=0)
    gated: bool = option(False, "gated")
    score: Literal["softmax", "sigmoid"] = option("softmax", "score")
    extra: dict | None = option(None, "anything")

    def __post_init__(self):
        check_config_fields(self)


@pytest.mark.parametrize("kw, message", [
    (dict(width=0), "config field 'width' must be a positive integer, got 0"),
    (dict(width=1e400), "config field 'width' must be a positive integer, got inf"),
    (dict(width=True), "config field 'width' must be a positive integer, got True"),
    (dict(layers=[0, -1]), "config field 'layers' must be a list of non-negative integers, got [0, -1]"),
    (dict(layers=3), "config field 'layers' must be a list of non-negative integers, got 3"),
    (dict(eps="x"), "config field 'eps' must be a positive finite number, got 'x'"),
    (dict(eps=math.inf), "config field 'eps' must be a positive finite number, got inf"),
    (dict(noise=1.0), "config field 'noise' must be a number in [0, 1), got 1.0"),
    (dict(factor=0), "config field 'factor' must be a positive finite number or null, got 0"),
    (dict(gated=1), "config field 'gated' must be true or false, got 1"),
    (dict(score="tanh"), "score 'tanh' is not supported; expected one of softmax, sigmoid"),
    (dict(score=3), "config field 'score' must be a string, got 3"),
    (dict(extra=[1]), "config field 'extra' must be an object or null, got [1]"),
])
def test_config_checks_name_the_field_and_what_it_must_be(kw, message):
    with pytest.raises(ConfigError) as e:
        Config(**kw)
    assert str(e.value) == message


def test_good_config_values_pass():
    c = Config(width=2, layers=[], eps=1, noise=0.5, factor=1.25, gated=True, score="sigmoid", extra={"a": 1})
    assert (c.width, c.eps, c.score) == (2, 1, "sigmoid")


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
