"""Tests of selection: the gate, the memory budget, the preference, and a reason for every other variant.

The fixtures they share with every folder are in tests/conftest.py."""
