#!/bin/bash
# Stage what the GPU machine (no network) needs under tmp/gpu (git-ignored, under the 64 MiB
# carry limit): llama.cpp's sources as vendored by llama-cpp-python 0.3.36 (backends other
# than CPU and CUDA left out), llama-cpp-python's Python files and diskcache, the built tap
# library, the converted tiny fixture, and the check itself. Then, on the device:
#   bash tmp/gpu/run.sh      (carry: tmp/gpu)
set -e
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf tmp/gpu && mkdir -p tmp/gpu/llama.cpp tmp/gpu/pkg tmp/gpu/fx
$PY -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d tmp/gpu-sdist -q
tar xzf tmp/gpu-sdist/llama_cpp_python-0.3.36.tar.gz -C tmp/gpu-sdist
SRC=tmp/gpu-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
cp -r $SRC/CMakeLists.txt $SRC/cmake $SRC/ggml $SRC/src $SRC/include $SRC/common $SRC/vendor $SRC/licenses tmp/gpu/llama.cpp/
rm -rf tmp/gpu/llama.cpp/ggml/src/ggml-{sycl,vulkan,opencl,hexagon,metal,et,cann,musa,webgpu,zdnn,openvino}
cp -r "$SITE/llama_cpp" "$SITE/diskcache" tmp/gpu/pkg/
rm -rf tmp/gpu/pkg/llama_cpp/lib
find tmp/gpu/pkg -name __pycache__ -prune -exec rm -rf {} +
cp "$($PY -c 'import edge_ms.tap as t; print(t._find_lib())')" tmp/gpu/
$PY -c "from edge_ms.convert import convert; convert('tests/fixtures/tiny-qwen2', 'tmp/gpu/fx/out', quant='f32')"
cp scripts/gpu_check/run.sh scripts/gpu_check/check.py tmp/gpu/
du -sh tmp/gpu
