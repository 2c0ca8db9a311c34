"""ONNX graph rewriting at export time: the GGUF-block MatMulNBits rewrite (int4) and the fused decoder (fuse).

Code that runs without onnx (the engine benchmark's profile reader) imports :mod:`calm_cli.fleet.graph.names`
only: plain strings, while the other modules need onnx.
"""
