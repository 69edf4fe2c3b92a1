"""The application layer: the `moekit` command line. It parses arguments into each room's options dataclass,
calls that room, and turns its errors into one line. Nothing imports it (launchers' `__main__` modules aside)."""
