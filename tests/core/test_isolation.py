"""A native crash in a child process becomes an error that names the signal; results and Python errors come
back as they were."""

from __future__ import annotations

import pytest
from faults import abort, bad_value, double, hang, illegal_instruction, killed

from edgepack.core.errors import EngineCrashedError
from edgepack.core.isolation import call_isolated, describe_exit


def test_a_result_comes_back():
    assert call_isolated("doubling", double, 21) == 42


def test_a_python_error_comes_back_as_itself():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        call_isolated("sampling", bad_value)


@pytest.mark.parametrize(("fault", "signal_name", "hint"), [
    (abort, "SIGABRT", "aborted"),
    (illegal_instruction, "SIGILL", "CPU instructions"),
    (killed, "SIGKILL", "out-of-memory"),
])
def test_a_crash_names_its_signal_and_what_to_do(fault, signal_name, hint):
    with pytest.raises(EngineCrashedError) as caught:
        call_isolated("scoring gguf-q8_0", fault)
    assert caught.value.cause.startswith(signal_name)
    assert str(caught.value).startswith("scoring gguf-q8_0: the engine crashed with " + signal_name)
    assert hint in str(caught.value) and caught.value.exit_code == 8
    assert call_isolated("after the crash", double, 1) == 2  # the caller is still fine


def test_exit_statuses_described():
    assert describe_exit(-4)[0] == "SIGILL (Illegal instruction)"
    assert describe_exit(-9)[0].startswith("SIGKILL")
    assert describe_exit(3)[0] == "exit status 3"


def test_a_hung_engine_is_stopped_at_the_timeout():
    with pytest.raises(EngineCrashedError, match="scoring gguf-q8_0: the engine did not finish within 1 s") as caught:
        call_isolated("scoring gguf-q8_0", hang, timeout_s=1)
    assert caught.value.cause == "timeout"
    assert call_isolated("after the hang", double, 2, timeout_s=30) == 4
