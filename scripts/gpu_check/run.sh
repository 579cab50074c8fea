#!/bin/bash
# One-shot GPU check: build llama.cpp (the version llama-cpp-python 0.3.36 vendors) with CUDA,
# then run edge_ms's engine + native tap with every layer on the GPU against the same on CPU.
# Prepared here by scripts/gpu_check/prepare.sh; run there from the repository root with tmp/gpu carried.
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
PYTHONPATH=tmp/gpu/pkg:. python3 -X faulthandler tmp/gpu/check.py > $OUT/check.log 2>&1
grep -i "offloaded\|GPU TAP\|same_tokens\|steps_compared\|max_" $OUT/check.log
