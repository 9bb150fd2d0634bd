"""Errors a user can act on, and the exit codes they end a command with. The CLI prints the message and exits
with `exit_code`; the server answers an ApiError with its HTTP status and OpenAI's error body.

| exit | error                  | meaning                                                         |
|------|------------------------|-----------------------------------------------------------------|
| 2    | EdgepackError          | bad input: a missing file, a bad option, a corrupt artifact     |
| 3    | UnsupportedModelError  | an architecture, weight format or tokenizer we do not convert   |
| 4    | ParityError            | a converted file does not behave like the original              |
| 5    | NothingPassedError     | no variant passes the quality gate                              |
| 6    | NothingFitsError       | no variant that passes the gate fits the target's memory budget |
| 7    | BundleInvalidError     | a bundle whose manifest or files do not check out               |
| 8    | EngineCrashedError     | a native engine crashed (a build rejects that variant instead)  |
"""

from __future__ import annotations

from typing import Any


class EdgepackError(Exception):
    """Bad input or a failed check, explained in words a user can act on."""

    exit_code = 2


class UnsupportedModelError(EdgepackError):
    """The model's architecture, weights or tokenizer are not something we convert."""

    exit_code = 3


class ParityError(EdgepackError):
    """A converted file does not behave like the original (tokens or logits differ)."""

    exit_code = 4


class NothingPassedError(EdgepackError):
    """No variant passes the quality gate."""

    exit_code = 5


# `edgepack eval` exits with this when no variant passes the quality gate (the report is still printed).
NOTHING_PASSED_EXIT_CODE = NothingPassedError.exit_code


class NothingFitsError(EdgepackError):
    """No variant both passes the gate and fits the target's memory budget."""

    exit_code = 6


class BundleInvalidError(EdgepackError):
    """A bundle whose manifest or files do not check out."""

    exit_code = 7


class EngineCrashedError(EdgepackError):
    """A native engine (llama.cpp, ONNX Runtime) ended its process: a signal, an abort, the out-of-memory killer.
    `cause` names it, e.g. "SIGILL (Illegal instruction)"."""

    exit_code = 8

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):
        return (type(self), (str(self), self.cause))


class OutputConstraintError(EdgepackError):
    """A constrained generation reached a point where its grammar allows no token the model has (a schema whose
    pattern no tokens can spell, say): the generation ends with this instead of going on outside the grammar."""


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(EdgepackError):
    """A request the server answers with an HTTP error status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers or {}


class UpstreamError(EdgepackError):
    """The upstream model could not answer (down, timed out, or an error status); the message never holds the
    key."""
