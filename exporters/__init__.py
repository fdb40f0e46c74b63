"""Exporters: from a bundle or nn.Module to deployable graphs (ONNX, TensorRT)."""
