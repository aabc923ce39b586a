"""splitstack serving: the Open Inference Protocol over ONNX Runtime, with dynamic batching and
atomic model version swaps (see services/serving/README.md)."""

__version__ = "0.1.0"
