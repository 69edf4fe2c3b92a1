"""Options declared once. A command's options are a dataclass; each field carries its type (the annotation),
its default, its help and its checks:

    @dataclass
    class TrainOptions:
        steps: int = option(200, "optimizer steps", metavar="N", min=1)
        lr: float = option(3e-3, "peak learning rate", gt=0)

The command line builds its flags from these fields (`moekit.args`); `check_options(obj)` validates an
instance from the same declarations (type, finite numbers, range, the choices of a `Literal[...]`), so the Python
API and the command line refuse the same values with the same one-line error, naming the flag. Configs declare
their fields the same way and `check_config_fields` checks them, naming the config field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, field
from typing import Any

from .errors import ConfigError, shown

MAX_SEED = 2**63 - 1


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **meta) -> Any:
    """A dataclass field with its command-line declaration in the metadata.

    The annotation gives the type; `Literal[...]` gives the choices (the command line's `choices=`, the check and
    its error). meta: metavar, flag (e.g. "--atol"; default --name-with-dashes; a bool defaulting to True becomes
    --no-name), parse (a function str -> value for the command line), default_text (shown instead of the
    default), min / max (inclusive) and gt / lt (exclusive) bounds, allow_inf, cli=False (Python API only)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **meta})


def flag_name(f: dataclasses.Field) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def choices_of(annotation: Any) -> tuple | None:
    """The values a `Literal[...]` annotation allows (also inside `| None` and `list[...]`), or None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if (choices := choices_of(arg)) is not None:
            return choices
    return None


def field_kind(annotation: Any) -> tuple[type | None, bool, bool]:
    """(scalar type, optional, list) of a field annotation: `int | None` -> (int, True, False),
    `list[str]` -> (str, False, True), `Literal["a", "b"]` -> (str, False, False); mixed unions ->
    (None, optional, False): checked by the class itself."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None, optional, False
        annotation = args[0]
    if typing.get_origin(annotation) in (list, tuple):
        return field_kind(typing.get_args(annotation)[0])[0], optional, True
    if (choices := choices_of(annotation)) is not None:
        return type(choices[0]), optional, False
    return (annotation if isinstance(annotation, type) else None), optional, False


@functools.cache
def declared_fields(cls) -> list[tuple[dataclasses.Field, type | None, bool, bool, tuple | None]]:
    """(field, scalar type, optional, list, choices) for every field declared with `option`."""
    hints = typing.get_type_hints(cls)
    return [(f, *field_kind(hints[f.name]), choices_of(hints[f.name])) for f in dataclasses.fields(cls)
            if "help" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_options(obj) -> None:
    """Check every declared field of `obj` against its declaration; ConfigError (one line, naming the flag) on the
    first bad one."""
    for f, kind, optional, many, choices in declared_fields(type(obj)):
        value, name = getattr(obj, f.name), flag_name(f).replace("--no-", "--")
        if f.metadata.get("positional"):
            name = f.metadata.get("metavar", f.name.upper())  # as the usage line shows it
        if value is None:
            if not optional and default_of(f) is not None:
                raise ConfigError(f"{name} must be given")
            continue
        if kind is None:
            continue
        if many:
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{name} must be a non-empty list, got {shown(value)}")
            for v in value:
                _check_value(name, v, kind, f.metadata, choices)
        else:
            _check_value(name, value, kind, f.metadata, choices)


def _is(v: Any, kind: type) -> bool:
    """v is a value of `kind` (a bool is not a number; an int is a float)."""
    if kind is bool or isinstance(v, bool):
        return kind is bool and isinstance(v, bool)
    return isinstance(v, (int, float)) if kind is float else isinstance(v, kind)


def _in_range(v: Any, meta: dict) -> bool:
    if isinstance(v, float) and not math.isfinite(v) and not (meta.get("allow_inf") and v == math.inf):
        return False
    return not (("min" in meta and v < meta["min"]) or ("gt" in meta and v <= meta["gt"])
                or ("max" in meta and v > meta["max"]) or ("lt" in meta and v >= meta["lt"]))


def _bounds(meta: dict) -> str:
    """'>= 1', '< 1' or 'in (0, 1]' from the declared bounds."""
    g = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    lo, hi = meta.get("min", meta.get("gt")), meta.get("max", meta.get("lt"))
    if lo is not None and hi is not None:
        return f"in {'(' if 'gt' in meta else '['}{g(lo)}, {g(hi)}{')' if 'lt' in meta else ']'}"
    if lo is not None:
        return f"{'>' if 'gt' in meta else '>='} {g(lo)}"
    return f"{'<' if 'lt' in meta else '<='} {g(hi)}"


def _check_value(name: str, v: Any, kind: type, meta: dict, choices: tuple | None) -> None:
    if not _is(v, kind):
        word = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
        raise ConfigError(f"{name} must be {word}, got {shown(v)}")
    if kind is float and not math.isfinite(v) and not (meta.get("allow_inf") and v == math.inf):
        raise ConfigError(f"{name} must be a finite number, got {v}")
    if choices is not None and v not in choices:
        raise ConfigError(f"{name} {shown(v)} is not one of {', '.join(map(str, choices))}")
    if not _in_range(v, meta):
        raise ConfigError(f"{name} must be {_bounds(meta)}, got {f'{v:g}' if isinstance(v, float) else v}")


def check_config_fields(obj) -> None:
    """Check every declared field of a config (read from config.json: any JSON value may arrive) against its
    declaration; ConfigError naming the field and what it must be, e.g. "config field 'hidden_size' must be a
    positive integer, got 0", or "hidden_act 'gelu' is not supported; expected one of silu"."""
    for f, kind, optional, many, choices in declared_fields(type(obj)):
        value = getattr(obj, f.name)
        if (value is None and optional) or kind is None:
            continue
        values = value if many and isinstance(value, list) else [value]
        if (many and not isinstance(value, list)) or not all(_is(v, kind) and _in_range(v, f.metadata)
                                                              for v in values):
            want = _config_word(kind, f.metadata)
            want = f"a list of {want.removeprefix('a ').removeprefix('an ')}s" if many else want
            raise ConfigError(f"config field '{f.name}' must be {want}{' or null' if optional else ''}, got "
                              f"{shown(value)}")
        if choices is not None and (bad := next((v for v in values if v not in choices), None)) is not None:
            raise ConfigError(f"{f.name} {shown(bad)} is not supported; expected one of {', '.join(map(str, choices))}")


def _config_word(kind: type, meta: dict) -> str:
    """What a config field of `kind` must be, in words."""
    if kind is bool:
        return "true or false"
    if kind is dict:
        return "an object"
    if kind is int:
        return {1: "a positive integer", 0: "a non-negative integer"}.get(meta.get("min"), "an integer")
    if kind is float:
        if meta.get("gt") == 0 and len(meta.keys() & {"min", "max", "lt"}) == 0:
            return "a positive finite number"
        return f"a number {_bounds(meta)}" if meta.keys() & {"min", "gt", "max", "lt"} else "a finite number"
    return "a string" if kind is str else f"a {kind.__name__}"


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_number(text: str | float) -> float:
    """'7B' / '6.7e9' / '300B' / '60T' / 3.14e23 -> a float (K 1e3, M 1e6, B or G 1e9, T 1e12, P 1e15)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGTP]?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"not a number: {shown(text)} (expected e.g. 7B, 6.7e9, 300B, 60e12)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def parse_size(size: int | str) -> int:
    """'5GB' / '500MiB' / 1000 -> bytes (GB = 10**9, GiB = 2**30, as transformers reads them)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"cannot read size '{size}'; expected e.g. 5GB, 500MB, 2GiB or a byte count")
    base = 1024 if m.group(3) else 1000
    return max(1, int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_")))
