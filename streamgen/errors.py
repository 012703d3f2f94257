"""Exceptions raised at streamgen's boundaries (configs, checkpoints, inputs).

Every user-facing error derives from :class:`StreamgenError`; the CLI prints it as one
line and exits non-zero instead of showing a traceback.
"""


class StreamgenError(Exception):
    """Base class of every error streamgen raises on bad input."""


class ConfigError(StreamgenError, ValueError):
    """A config, preset name or option value is invalid."""


class CheckpointError(StreamgenError):
    """A checkpoint file is missing, unreadable or does not match the model."""


class ActionError(StreamgenError, ValueError):
    """An action is outside the model's declared action space or malformed."""


class PromptError(StreamgenError, ValueError):
    """A prompt is empty, not text, or too long."""
