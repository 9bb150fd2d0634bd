"""Errors a user can act on. The CLI prints the message and exits with `exit_code`."""


class EdgepackError(Exception):
    """Bad input or a failed check, explained in words a user can act on."""

    exit_code = 2


class UnsupportedModelError(EdgepackError):
    """The model's architecture, weights or tokenizer are not something we convert."""

    exit_code = 3


class ParityError(EdgepackError):
    """A converted file does not behave like the original (tokens or logits differ)."""

    exit_code = 4


# `edgepack eval` exits with this when no variant passes the quality gate (the report is still printed).
NOTHING_PASSED_EXIT_CODE = 5


class NothingPassedError(EdgepackError):
    """No variant passes the quality gate."""

    exit_code = NOTHING_PASSED_EXIT_CODE
