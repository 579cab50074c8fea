"""edge_ms: reflective generative reasoning (MetaStone-S1) on device, through llama.cpp."""

import os

# llama.cpp's CPU backend uses OpenMP; its default busy-wait makes every decode step many
# times slower as soon as another process shares the cores (measured: 14-30x on 2 cores;
# docs/llama_cpp.md, section 4). Must be set before llama.cpp (and libgomp) is loaded; users
# can still override it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

# onnx and onnxruntime must be loaded before llama.cpp: on the H100 machine (CUDA 13 build of
# llama.cpp 0.3.36's sources, onnxruntime 1.30, Python 3.12) importing either one after a
# CUDA-enabled llama_cpp crashed the process (SIGSEGV during the import); the other order
# ran the engine and the tap on the GPU (docs/llama_cpp.md, section 5; tests/test_gpu.py).
try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
except ImportError:  # not installed: nothing to order (edge_ms.default_model works without them)
    pass

__version__ = "0.1.0"
__all__ = ["__version__"]
