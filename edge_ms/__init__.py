"""edge_ms: reflective generative reasoning (MetaStone-S1) on device, through llama.cpp."""

import os
import sys

# llama.cpp's CPU backend uses OpenMP; its default busy-wait makes every decode step many
# times slower as soon as another process shares the cores (measured: 14-30x on 2 cores;
# docs/llama_cpp.md, section 4). Must be set before llama.cpp (and libgomp) is loaded; users
# can still override it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

# onnx and onnxruntime must be loaded before llama.cpp: on the H100 machine (CUDA 13 build of
# llama.cpp 0.3.36's sources, onnxruntime 1.30, Python 3.12) importing either one after a
# CUDA-enabled llama_cpp crashed the process (SIGSEGV during the import); the other order
# ran the engine and the tap on the GPU (docs/llama_cpp.md, section 5; tests/test_gpu.py). They
# are loaded when llama_cpp is first imported, not here: they take seconds, and `import edge_ms` runs before the CLI
# can turn a Ctrl-C into "interrupted" (a traceback came out of these imports).


class _OnnxBeforeLlamaCpp:
    """An import hook that loads onnx and onnxruntime just before the first ``import llama_cpp``."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "llama_cpp":
            sys.meta_path.remove(self)
            from edge_ms.interrupts import import_held

            import_held("onnx", "onnxruntime")  # either may be missing: edge_ms.default_model needs neither
        return None  # the usual finders import llama_cpp itself


if "llama_cpp" not in sys.modules:
    sys.meta_path.insert(0, _OnnxBeforeLlamaCpp())

__version__ = "0.1.0"
__all__ = ["__version__"]
