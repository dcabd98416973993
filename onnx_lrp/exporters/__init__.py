"""Exporters for architectures that the standard ONNX exporters refuse or export wrongly."""
