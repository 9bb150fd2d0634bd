"""Tests of `edgepack build` end to end: bundles, the stage cache, kill and resume, exit codes.

The fixtures they share with every folder are in tests/conftest.py."""
