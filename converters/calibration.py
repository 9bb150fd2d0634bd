"""The calibration text quantizers learn activation statistics from: a built-in text of ~3,500 words of varied
prose written for edgepack (not the quality gate's evaluation text, so the gate does not score a variant on the
text it was tuned on), or a user's own file."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgepack.core.errors import EdgepackError

BUILTIN_CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")
BUILTIN_CALIBRATION_NAME = "edgepack built-in calibration text"


def read_calibration_text(path: Path | None) -> str | None:
    """`--calibration-text FILE`'s text; None when no file is given (the built-in text is used)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"calibration text {path} does not exist; expected a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgepackError(f"calibration text {path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise EdgepackError(f"calibration text {path} is empty; expected a few thousand words of text")
    return text


def calibration_text(text: str | None) -> str:
    """The text to calibrate on: `text`, or the built-in one when it is None."""
    return text if text is not None else BUILTIN_CALIBRATION_TEXT.read_text(encoding="utf-8")


def calibration_sha256(text: str | None) -> str:
    return hashlib.sha256(calibration_text(text).encode("utf-8")).hexdigest()
