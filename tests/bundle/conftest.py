"""Tests of the bundle's parts: manifest, archive, verify, report, deploy files, offline wheels.

The fixtures they share with every folder are in tests/conftest.py."""
