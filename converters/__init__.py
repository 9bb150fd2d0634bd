"""Converters: a Hugging Face model directory in, deployable variants (GGUF, ONNX) out."""
