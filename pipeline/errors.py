"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with 2."""


class PipelineError(Exception):
    """Base class: the message names the offending file, key or image."""


class BadInputError(PipelineError):
    """A dataset file is unusable: corrupt, truncated, empty, missing, or inconsistent."""


class WeightsError(PipelineError):
    """A weights file is missing, unreadable, unsafe, or for another architecture."""


class ConfigError(PipelineError):
    """A configuration value is invalid in a way the JSON schema cannot express."""
