#!/bin/bash
# Stage what a GPU machine without network needs to run tests/test_gpu.py under tmp/gpu
# (git-ignored, under the 64 MiB carry limit): llama.cpp's sources as vendored by
# llama-cpp-python 0.3.36 (backends other than CPU and CUDA left out), the pure-Python
# packages the test needs beyond numpy / onnx / onnxruntime / jinja2 (llama-cpp-python's
# Python files, diskcache, gguf, yaml, pytest and its dependencies), and the built tap
# library. Then, on the device:
#   bash scripts/gpu_check/run.sh      (carry: tmp/gpu)
set -e
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf tmp/gpu && mkdir -p tmp/gpu/llama.cpp tmp/gpu/pkg
$PY -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d tmp/gpu-sdist -q
tar xzf tmp/gpu-sdist/llama_cpp_python-0.3.36.tar.gz -C tmp/gpu-sdist
SRC=tmp/gpu-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
cp -r $SRC/CMakeLists.txt $SRC/cmake $SRC/ggml $SRC/src $SRC/include $SRC/common $SRC/vendor $SRC/licenses tmp/gpu/llama.cpp/
rm -rf tmp/gpu/llama.cpp/ggml/src/ggml-{sycl,vulkan,opencl,hexagon,metal,et,cann,musa,webgpu,zdnn,openvino}
for pkg in llama_cpp diskcache gguf yaml pytest _pytest pluggy iniconfig packaging pygments; do
  cp -r "$SITE/$pkg" tmp/gpu/pkg/
done
rm -rf tmp/gpu/pkg/llama_cpp/lib tmp/gpu/pkg/yaml/*.so
find tmp/gpu/pkg -name __pycache__ -prune -exec rm -rf {} +
cp "$($PY -c 'import edge_ms.tap as t; print(t._find_lib())')" tmp/gpu/
du -sh tmp/gpu
