"""llama.cpp on CPUs with AMX: the extra buffer types are turned off there, and quantized GGUF runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.core.cpu import cpu_flags
from runtimes.llamacpp_amx import AMX_CPU_FLAGS, OVERRIDE_ENV, extra_buffers_allowed

CPUINFO = Path(__file__).parents[1] / "data" / "cpuinfo"


def test_recorded_amx_xeon_turns_the_extra_buffers_off():
    # recorded on an Intel Xeon (family 6, model 207) under KVM, where quantized GGUF crashed with SIGILL
    flags = cpu_flags((CPUINFO / "xeon-amx-kvm.txt").read_text())
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx512f"} <= flags
    assert extra_buffers_allowed(flags) is False


def test_a_cpu_without_amx_keeps_the_extra_buffers():
    # the same recorded CPU with its AMX flags taken out: an AVX-512 CPU without AMX
    flags = cpu_flags((CPUINFO / "xeon-amx-kvm.txt").read_text()) - AMX_CPU_FLAGS
    assert "avx512f" in flags
    assert extra_buffers_allowed(flags) is True
    assert extra_buffers_allowed(frozenset()) is True  # not Linux, no flags read


def test_the_override_wins_and_a_bad_value_is_refused():
    amx = frozenset({"amx_int8", "amx_tile"})
    assert extra_buffers_allowed(amx, "on") is True
    assert extra_buffers_allowed(frozenset(), "off") is False
    with pytest.raises(ValueError, match="accepted: on, off"):
        extra_buffers_allowed(amx, "maybe")


def test_an_arm_cpu_keeps_the_extra_buffers():
    flags = cpu_flags("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert flags == {"fp", "asimd", "asimddp"} and extra_buffers_allowed(flags) is True


@pytest.mark.parametrize("kind", ["gguf-q8_0", "gguf-q4_k_m"])
def test_quantized_gguf_generates_in_a_child_process_on_this_cpu(tiny_model, tmp_path, kind):
    """On an AMX CPU this crashed the process with SIGILL before the extra buffers were turned off; the child
    keeps a crash from taking pytest down and shows up as its signal."""
    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert

    convert(tiny_model("llama-bpe"), [kind], tmp_path, ConvertOptions(show_progress=False))
    script = ("import sys; from runtimes.llamacpp import LlamaCppRuntime; from runtimes.base import "
              "GenerationOptions; r = LlamaCppRuntime(sys.argv[1]); "
              "out = r.complete(r.tokenize('hello world'), GenerationOptions(max_tokens=8, ignore_eos=True)); "
              "print(out.completion_tokens)")
    env = {k: v for k, v in os.environ.items() if k != OVERRIDE_ENV}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{kind}.gguf")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split()[-1] == "8"
