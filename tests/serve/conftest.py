"""Tests of the server and the router: a real HTTP server on 127.0.0.1 and the real openai client.

The fixtures they share with every folder are in tests/conftest.py."""

from __future__ import annotations

import pytest
from serving_helpers import open_model

from edgepack.serve.app import ServerConfig, start_server_thread


@pytest.fixture(scope="module")
def server(tiny_gguf):
    """The tiny chat model served from a thread of this process, one generation at a time, for a module's tests."""
    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0))
    yield running
    running.stop()
    model.close()
