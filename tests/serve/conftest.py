"""Tests of the server and the router: a real HTTP server on 127.0.0.1 and the real openai client.

The fixtures they share with every folder are in tests/conftest.py."""
