"""GGUF: our HF -> GGUF converter on gguf-py, llama.cpp's quantizer, and the GGUF -> HF importer."""
