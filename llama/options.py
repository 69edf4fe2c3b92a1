"""Options declared once. A command's options are a dataclass; each field carries its type (the annotation),
its default, its help and its checks:

    @dataclass
    class TrainOptions:
        steps: int = option(200, "optimizer steps", metavar="N", min=1)
        lr: float = option(3e-3, "peak learning rate", gt=0)

The command line builds its flags from these fields (`moekit.args`); `check_options(obj)` validates an
instance from the same declarations (type, finite numbers, range, choices), so the Python API and the command
line refuse the same values with the same one-line error, naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, field
from typing import Any

from .errors import ConfigError

MAX_SEED = 2**63 - 1


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **meta) -> Any:
    """A dataclass field with its command-line declaration in the metadata.

    meta: metavar, choices, flag (e.g. "--atol"; default --name-with-dashes; a bool defaulting to True becomes
    --no-name), parse (a function str -> value for the command line), default_text (shown instead of the
    default), min / max (inclusive) and gt / lt (exclusive) bounds, allow_inf, cli=False (Python API only)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **meta})


def flag_name(f: dataclasses.Field) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def field_kind(annotation: Any) -> tuple[type | None, bool, bool]:
    """(scalar type, optional, list) of a field annotation: `int | None` -> (int, True, False),
    `list[str]` -> (str, False, True); mixed unions -> (None, optional, False): checked by the class itself."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None, optional, False
        annotation = args[0]
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], optional, True
    return (annotation if isinstance(annotation, type) else None), optional, False


def declared_fields(cls) -> list[tuple[dataclasses.Field, type | None, bool, bool]]:
    """(field, scalar type, optional, list) for every field declared with `option`."""
    hints = typing.get_type_hints(cls)
    return [(f, *field_kind(hints[f.name])) for f in dataclasses.fields(cls) if "help" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_options(obj) -> None:
    """Check every declared field of `obj` against its declaration; ConfigError (one line) on the first bad one."""
    for f, kind, optional, many in declared_fields(type(obj)):
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
                raise ConfigError(f"{name} must be a non-empty list, got {value!r}")
            for v in value:
                _check_value(name, v, kind, f.metadata)
        else:
            _check_value(name, value, kind, f.metadata)


def _check_value(name: str, v: Any, kind: type, meta: dict) -> None:
    if kind is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
        return
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    if kind is float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(v) and not (meta.get("allow_inf") and v == math.inf):
            raise ConfigError(f"{name} must be a finite number, got {v}")
    if kind is str and not isinstance(v, str):
        raise ConfigError(f"{name} must be a string, got {v!r}")
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{name} '{v}' is not one of {', '.join(map(str, choices))}")
    g = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    lo, hi = meta.get("min", meta.get("gt")), meta.get("max", meta.get("lt"))
    lo_open, hi_open = "gt" in meta, "lt" in meta
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        if lo is not None and hi is not None:
            want = f"in {'(' if lo_open else '['}{g(lo)}, {g(hi)}{')' if hi_open else ']'}"
        elif lo is not None:
            want = f"{'>' if lo_open else '>='} {g(lo)}"
        else:
            want = f"{'<' if hi_open else '<='} {g(hi)}"
        raise ConfigError(f"{name} must be {want}, got {g(v)}")


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_number(text: str | float) -> float:
    """'7B' / '6.7e9' / '300B' / '60T' / 3.14e23 -> a float (K 1e3, M 1e6, B or G 1e9, T 1e12, P 1e15)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGTP]?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"not a number: {text!r} (expected e.g. 7B, 6.7e9, 300B, 60e12)")
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
