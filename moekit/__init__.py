"""The application layer: the `moekit` command line. It parses arguments into each room's options dataclass,
calls that room, and turns its errors into one line. Nothing imports it (launchers' `__main__` modules aside)."""

import sys


def main(argv: list[str] | None = None) -> int:
    """The `moekit` entry point: Ctrl-C while the command line itself is importing is one line too."""
    try:
        from .cli import main as run
    except (KeyboardInterrupt, RuntimeError) as e:
        # Ctrl-C inside a class statement reaches us wrapped: "Error calling __set_name__ ..." from the interrupt
        if not isinstance(e, KeyboardInterrupt) and not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        print("moekit: interrupted", file=sys.stderr)
        return 130
    return run(argv)
