#!/bin/bash
# On the GPU machine, from the repository root with tmp/gpu carried (scripts/gpu_check/prepare.sh):
# build llama.cpp (the version llama-cpp-python 0.3.36 vendors) with CUDA, then run
# tests/test_gpu.py against it; llama.cpp's log lines show how many layers went to the GPU.
set -e
B=build/gpu-llama
if [ ! -f $B/bin/libllama.so ]; then
  cmake -S tmp/gpu/llama.cpp -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF > $OUT/cmake.log 2>&1 || { tail -30 $OUT/cmake.log; exit 1; }
  START=$(date +%s)
  cmake --build $B -j16 > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
  echo "build seconds: $(( $(date +%s) - START ))"
fi
mkdir -p tmp/gpu/pkg/llama_cpp/lib
cp -a $B/bin/*.so* tmp/gpu/pkg/llama_cpp/lib/
cp tmp/gpu/libedge_ms_tap.so edge_ms/
rc=0
EDGE_MS_LLAMA_LOG=1 PYTHONPATH=tmp/gpu/pkg:. python3 -X faulthandler -m pytest -p no:cacheprovider -rs \
  -o log_cli=true --log-cli-level=DEBUG tests/test_gpu.py > $OUT/check.log 2>&1 || rc=$?
grep -i "offloaded\|passed\|failed\|skipped\|error" $OUT/check.log | tail -20
exit $rc
