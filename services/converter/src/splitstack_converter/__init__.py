"""splitstack converter: turns a registered exported program into verified, measured inference
artifacts for one inference target (ONNX FP32, ONNX INT8, TensorRT engines) and records them,
with the target's serving choice, in the registry."""
