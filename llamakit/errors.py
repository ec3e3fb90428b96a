"""Errors a user can cause. The CLI prints them in one line; library callers can catch them.

This module imports nothing from the package, so every layer may use it.
"""


class LlamakitError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


class ConfigError(LlamakitError):
    """An invalid or unsupported model configuration."""


class TokenizerError(LlamakitError):
    """A missing, unreadable or mismatched tokenizer file."""


class CheckpointError(LlamakitError):
    """A missing, malformed or mismatched checkpoint."""


class DataError(LlamakitError):
    """Missing, empty, malformed or mismatched training data."""


class EvalError(LlamakitError):
    """An unknown task, a missing or malformed evaluation file, or an example that cannot be scored."""
