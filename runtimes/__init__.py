"""Runtimes: load one artifact and run it (llama.cpp over GGUF, transformers as the reference)."""
