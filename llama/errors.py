"""Errors moekit reports to users: one line, naming the file, tensor or field and what was expected."""


class MoekitError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero (``--debug`` shows the traceback)."""


class ConfigError(MoekitError, ValueError):
    """A config field is missing, has the wrong type, or names an impossible combination."""


class CheckpointError(MoekitError, OSError):
    """A checkpoint directory or file is missing, truncated, or of the wrong architecture."""


SHOWN = 80  # characters of an untrusted value a message shows


def shown(value, limit: int = SHOWN) -> str:
    """An untrusted value (from a file, an option, a tensor name) as a message may show it: repr-like, with every
    control and non-printable character escaped, about `limit` characters at most, and what was left out counted.
    The work is bounded whatever the value's size or depth (a YAML alias bomb included)."""
    out: list[str] = []
    _render(value, out, [limit], 0)
    return "".join(out)


def _render(value, out: list[str], budget: list[int], depth: int) -> None:
    """Append `value`'s text to `out`, spending what is left of `budget[0]` characters (roughly)."""
    if budget[0] <= 0:
        text = "..."
    elif isinstance(value, (list, tuple, set, frozenset, dict)):
        return _render_container(value, out, budget, depth)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:budget[0]])  # repr escapes control and non-printable characters
        if len(value) > budget[0]:
            text = f"{text[:-1]}...{text[-1]} ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        text = f"<an integer of {value.bit_length():,} bits>"  # repr of a 5000-digit integer raises
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    else:
        text = one_line(repr(value), budget[0])
    out.append(text)
    budget[0] -= len(text)


def _render_container(value, out: list[str], budget: list[int], depth: int) -> None:
    open_, close = {list: "[]", tuple: "()"}.get(type(value), "{}")
    if depth >= 6:
        out.append(f"{open_}...{close}")
        budget[0] -= 5
        return
    out.append(open_)
    for i, item in enumerate(value.items() if isinstance(value, dict) else value):
        if budget[0] <= 0:
            out.append(f"... ({len(value):,} items)")
            break
        if i:
            out.append(", ")
            budget[0] -= 2
        if isinstance(value, dict):
            _render(item[0], out, budget, depth + 1)
            out.append(": ")
            item = item[1]
        _render(item, out, budget, depth + 1)
    out.append(close)


def one_line(message: str, limit: int = 1000) -> str:
    """A message as one terminal line: control characters (newlines, escape sequences) escaped, `limit`
    characters at most. Every error the command line prints goes through this."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message[:limit + 1])
    return text if len(text) <= limit else text[:limit] + f"... ({len(message):,} characters)"
