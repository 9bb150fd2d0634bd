"""Tests of the floor every stage stands on (edgepack.core).

The fixtures they share with every folder are in tests/conftest.py."""
