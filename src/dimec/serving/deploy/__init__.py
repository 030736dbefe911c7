"""Deployment: exporting tier packages (and the mobile ONNX graph), starting servers locally, Ray Serve.
See serving/__init__.py."""
