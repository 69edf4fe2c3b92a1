"""Command-line flags built from options dataclasses (see `moekit.llama.options`): one flag per declared field,
with the field's type, default, choices (its `Literal[...]`) and help, so an option is declared in exactly one place."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from moekit.llama.errors import one_line
from moekit.llama.options import declared_fields, default_of, flag_name


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the error and where to look, no usage block) and no abbreviated
    flags (--token would be ambiguous, and a later option could silently change what an abbreviation means)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def help_text(f, default: Any) -> str:
    meta = f.metadata
    text = meta["help"]
    shown = meta.get("default_text", default)
    if meta.get("required") or meta.get("positional") or isinstance(default, bool) or shown is None:
        return text.replace("%", "%%")
    if isinstance(shown, (list, tuple)):
        shown = " ".join(map(str, shown))
    return f"{text} (default: {shown})".replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """A flag (or positional) for every field of `cls` declared with `llama.options.option`."""
    for f, kind, _optional, many, choices in declared_fields(cls):
        meta, default = f.metadata, default_of(f)
        if meta.get("cli", True) is False:
            continue
        kw: dict[str, Any] = {"help": help_text(f, default)}
        if meta.get("positional"):
            nargs = {"nargs": "+"} if many else {"nargs": "?", "default": default} if default is None else {}
            parser.add_argument(f.name, metavar=meta.get("metavar", f.name.upper()), **nargs, **kw)
            continue
        kw.update(dest=f.name, default=default)
        if kind is bool:
            kw["action"] = "store_false" if default is True else "store_true"
        else:
            kw["type"] = meta.get("parse") or kind or str
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
            if choices is not None:
                kw["choices"] = choices
            if many:
                kw["nargs"] = "+"
            if meta.get("required"):
                kw["required"] = True
        parser.add_argument(flag_name(f), **kw)
    return parser


def options_from(cls, args: argparse.Namespace):
    """An instance of `cls` from the parsed flags (its own checks run on construction)."""
    return cls(**{f.name: getattr(args, f.name) for f, *_ in declared_fields(cls) if hasattr(args, f.name)})


def given_options(cls, argv: list[str]) -> set[str]:
    """The fields of `cls` whose flags appear in `argv` (typed by the user, whatever their values)."""
    names = set()
    for f, *_ in declared_fields(cls):
        flag = flag_name(f)
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            names.add(f.name)
    return names


def print_error(command: str, message: str) -> None:
    """One line on stderr, whatever the message holds (control characters escaped, long values cut), naming the
    user's paths: an output's temporary directory (DST.tmp-<hex>) is shown as DST."""
    message = re.sub(r"\.tmp-[0-9a-f]{12}\b", "", message)
    print(one_line(f"moekit{' ' + command if command else ''}: error: {message}"), file=sys.stderr)
