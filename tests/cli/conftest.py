"""Tests of the `edgepack` command as a user runs it: exit codes, JSON on stdout, messages on stderr.

The fixtures they share with every folder are in tests/conftest.py."""
