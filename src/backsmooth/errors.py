"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import unicodedata


class BacksmoothError(Exception):
    """A mistake in the user's input (config, data, paths, checkpoints), not a bug."""


class ConfigError(BacksmoothError, ValueError):
    """An invalid configuration value or combination."""


class DataError(BacksmoothError):
    """Missing, malformed or inconsistent data."""


class CheckpointError(BacksmoothError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


class TrainingDiverged(BacksmoothError):
    """The loss became non-finite; the last good checkpoint is kept (exit code EXIT_DIVERGED)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved and the same command resumes (exit code EXIT_INTERRUPTED)."""


EXIT_USAGE = 2  # a BacksmoothError: bad input, one line on stderr, nothing written
EXIT_DIVERGED = 3  # training stopped on a non-finite loss
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving its state; the same command resumes


def one_line(text: str) -> str:
    """`text` with every line break and other control character escaped, so an error that quotes the
    user's input (a path with a newline, say) still prints as exactly one line."""
    return "".join(ch if ch == " " or not (ch.isspace() or unicodedata.category(ch).startswith("C"))
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)
