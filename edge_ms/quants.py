"""The data types edge_ms offers, by name: GGUF weight types and KV-cache types, and what they cost.

A leaf module (no imports from edge_ms, llama.cpp or onnx), so that the CLI can list the
choices and the memory planner can size them without loading a runtime library.
"""

from __future__ import annotations

__all__ = ["KV_BYTES_PER_VALUE", "QUANTS", "QUANT_PREFERENCE", "kv_bytes_per_cell"]

# GGUF types `edge-ms convert` and `edge-ms pull` write (--quant).
QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
# With several GGUFs and no --quant, the smallest that is still good: decoding on a device is
# bound by memory bandwidth, q4_k_m (about 4.8 bits per weight, llama.cpp's usual default) reads
# under a third of f16's bytes per token, q8_0 is close to lossless, f16/f32 are references.
QUANT_PREFERENCE = ("q4_k_m", "q8_0", "f16", "f32")

# KV-cache types (--kv-type) and the bytes one cached value takes: q8_0 stores 32 values in 34 bytes.
KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32}


def kv_bytes_per_cell(n_layer: int, n_head_kv: int, head_dim: int, kv_type: str) -> float:
    """KV-cache bytes of one cell (one token of one sequence): K and V of every layer."""
    return n_layer * 2 * n_head_kv * head_dim * KV_BYTES_PER_VALUE[kv_type]
