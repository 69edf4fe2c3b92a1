"""Errors moekit reports to users: one line, naming the file, tensor or field and what was expected."""


class MoekitError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero (``--debug`` shows the traceback)."""


class ConfigError(MoekitError, ValueError):
    """A config field is missing, has the wrong type, or names an impossible combination."""


class CheckpointError(MoekitError, OSError):
    """A checkpoint directory or file is missing, truncated, or of the wrong architecture."""
