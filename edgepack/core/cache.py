"""Where edgepack keeps what it makes once and reuses (the demo student, later stage outputs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$EDGEPACK_CACHE, else $XDG_CACHE_HOME/edgepack, else ~/.cache/edgepack."""
    if os.environ.get("EDGEPACK_CACHE"):
        return Path(os.environ["EDGEPACK_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgepack"
