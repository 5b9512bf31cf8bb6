"""Errors a user can act on. The CLI prints them as `error: <message>` and exits 2, no traceback."""


class UpstackError(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug in upstack."""

    exit_code = 2


class ConfigError(UpstackError):
    """A command-line option, recipe or config field is invalid."""


class CheckpointError(UpstackError):
    """A checkpoint folder is missing, incomplete, corrupt or unsafe."""


class DataError(UpstackError):
    """A dataset file or row is malformed (message names file, row and field)."""


class OutputExistsError(UpstackError):
    """The output path exists and --overwrite was not given."""
