"""armor-export: ARMOR 2:4 factorisation of LLM linears (W = A.S.B), from model to deployable engine.

Importing this package is cheap: it imports neither onnxruntime, TensorRT nor TensorRT-LLM, and
does not initialise CUDA.
"""
__version__ = "0.1.0"
