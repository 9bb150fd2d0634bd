"""ONNX: optimum-onnx's export with KV cache and ONNX Runtime's int8/int4 quantizers."""
