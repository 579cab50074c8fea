"""Check edge_ms.plan's memory estimate against the peak resident memory of real generations.

A random-weight model with MetaStone-S1-1.5B's exact shape and llama.cpp's Q4_K_M tensor
types (1.1 GB, written once under ~/.cache/edge_ms/bench/) is loaded by a fresh subprocess
per configuration, which runs one generation and reports its peak RSS (VmHWM) and the
buffer sizes llama.cpp logged. The KV cache is cleared (touched) when the context is
created, so a generation cut short after a few steps already holds all of it; the
subprocess stops after ``--steps`` decode steps to keep the run short.

    python benchmarks/bench_plan.py --out bench_plan.json

Prints one JSON object: per configuration the estimate by part, the measured peak and the
error of the estimate ((estimate - measured) / measured), and the baseline RSS of the
interpreter with every runtime library imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = [  # (n, max_new_tokens, kv_type, extra_bufts)
    (1, 256, "f16", False),
    (2, 2048, "f16", False),
    (8, 1024, "f16", False),
    (8, 4096, "f16", False),
    (8, 4096, "q8_0", False),
    (32, 1024, "f16", False),
    (32, 2048, "q8_0", False),
    (8, 1024, "f16", True),
    (32, 2048, "q8_0", True),
]
PROMPT_WORDS = 60  # the synthetic vocabulary has no merges: two tokens a word


def _block_bytes(rng: np.random.Generator, n_rows: int, n_cols: int, type_name: str) -> np.ndarray:
    """Random but well-formed quantized rows: finite, small scales so activations stay finite."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    n_blocks = n_rows * n_cols // block
    data = np.frombuffer(rng.bytes(n_blocks * size), dtype=np.uint8).reshape(n_blocks, size).copy()
    if type_name == "Q4_K":  # d, dmin (f16) then 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        data[:, 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        data[:, 2:4] = np.frombuffer(np.float16(1.5e-3).tobytes(), np.uint8)
    elif type_name == "Q6_K":  # 128 + 64 bytes of 6-bit values, 16 int8 scales, then d (f16)
        data[:, 208:210] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    else:
        raise ValueError(type_name)
    return data.reshape(n_rows, n_cols // block * size)


def write_model(out_dir: Path, size: str = "1.5b", quant: str = "q4_k_m", seed: int = 0) -> tuple[Path, Path]:
    """A random-weight GGUF with a published shape and llama.cpp's tensor types, and a random head for it."""
    import gguf
    from _synthetic import bytes_to_unicode, write_raw_gguf

    from edge_ms import gguf_export
    from edge_ms.head import HeadSpec, write_head
    from edge_ms.plan import preset_shape, qwen2_tensors

    shape = preset_shape(size, quant)
    gguf_path = out_dir / f"synthetic-{size}-{quant}.gguf"
    head_path = out_dir / f"synthetic-{size}.sprm.onnx"
    fingerprint = f"synthetic-{size}-{seed}"
    if gguf_path.is_file() and head_path.is_file():
        return gguf_path, head_path
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    specials = [
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
        "<｜User｜>",
        "<｜Assistant｜>",
        "<think>",
        "</think>",
    ]
    tokens = bytes_to_unicode() + ["ĊĊ", ".ĊĊ"]
    tokens += [f"Ġw{i}" for i in range(shape.n_vocab - len(tokens) - len(specials))] + specials
    types = [1] * (shape.n_vocab - len(specials)) + [3] * len(specials)  # 1 normal, 3 control
    delimiter = tokens.index(".ĊĊ")

    params = gguf_export.Qwen2Params(
        n_layer=shape.n_layer, hidden_size=shape.n_embd, n_head=shape.n_head, n_head_kv=shape.n_head_kv,
        head_dim=shape.n_embd // shape.n_head, ffn_size=shape.n_ff, context_length=shape.n_ctx_train,
        rope_theta=10000.0, rms_eps=1e-6, vocab_size=shape.n_vocab, tied_embeddings=False,
    )
    vocab = gguf_export.Vocab(
        tokens=tokens, types=types, merges=["Ċ Ċ", ". ĊĊ"], bos_id=tokens.index("<｜begin▁of▁sentence｜>"),
        eos_id=tokens.index("<｜end▁of▁sentence｜>"), pad_id=None, add_bos=True, chat_template=None, ids={},
    )
    tensors = qwen2_tensors(shape, quant)

    def arrays():
        for name, dims, type_name in tensors:
            if type_name != "F32":
                yield _block_bytes(rng, dims[0], dims[1], type_name)
            else:
                yield np.ones(dims, np.float32) if name.endswith("norm.weight") else np.zeros(dims, np.float32)

    write_raw_gguf(gguf_path, shape.name, params, vocab, gguf.LlamaFileType.MOSTLY_Q4_K_M, tensors, arrays(),
                   fingerprint)

    c = shape.n_embd
    weights = {
        "0.weight": rng.normal(0, c**-0.5, (2 * c, c)).astype(np.float32),
        "0.bias": np.zeros(2 * c, np.float32),
        "3.weight": rng.normal(0, (2 * c) ** -0.5, (1, 2 * c)).astype(np.float32),
        "3.bias": np.zeros(1, np.float32),
    }
    spec = HeadSpec(layer=shape.n_layer - 2, hidden_size=c, step_delimiter_ids=(delimiter,), think_start_id=None,
                    think_end_id=None, backbone_fingerprint=fingerprint)
    write_head(head_path, weights, spec)
    return gguf_path, head_path


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _page_out(path: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_pageout = 21  # Linux 5.4+
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if libc.madvise(lo, hi - lo, madv_pageout) != 0:
                    raise OSError(ctypes.get_errno(), "madvise(MADV_PAGEOUT) failed")


def child(args: dict) -> dict:
    """Runs in a fresh process: one generation, then the peak RSS and llama.cpp's buffer sizes."""
    if args["what"] == "baseline":
        import onnxruntime  # noqa: F401

        import edge_ms.reasoner  # noqa: F401  (llama_cpp, numpy, the tap library)
        from edge_ms.model import init_backend
        from edge_ms.tap import native_lib

        init_backend()
        native_lib()
        return {"peak_kib": _status_kib("VmHWM")}

    os.environ["EDGE_MS_LLAMA_LOG"] = "1"
    logged: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    lg = logging.getLogger("edge_ms.model")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(Grab())

    from edge_ms.model import DeviceSettings
    from edge_ms.reasoner import Reasoner

    settings = DeviceSettings(kv_type=args["kv_type"], extra_bufts=args["extra_bufts"])
    reasoner = Reasoner.load(args["gguf"], head=args["head"], settings=settings, memory_bytes=1 << 50)
    load_peak_kib = _status_kib("VmHWM")
    if args["extra_bufts"]:
        # Weight repacking copies most tensors out of the mapped file; the file pages it read stay
        # mapped but clean, so the kernel reclaims them under pressure. Page them out now and restart
        # the high-water mark, so the peak below is what the generation needs resident.
        _page_out(args["gguf"])
        Path("/proc/self/clear_refs").write_text("5")
    prompt = " ".join(["w"] * args["prompt_words"])
    steps = [0]

    def should_stop() -> bool:
        steps[0] += 1
        return steps[0] > args["steps"]

    t0 = time.perf_counter()
    res = reasoner.solve(
        prompt, n=args["n"], max_new_tokens=args["max_new_tokens"], raw=True, seed=1, should_stop=should_stop
    )
    wall = time.perf_counter() - t0
    text = "\n".join(logged)

    def mib(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    return {
        "peak_kib": _status_kib("VmHWM"),
        "load_peak_kib": load_peak_kib,
        "rss_anon_kib": _status_kib("RssAnon"),
        "rss_file_kib": _status_kib("RssFile"),
        "prompt_tokens": len(res.prompt_token_ids),
        "n_ctx": res.stats.n_ctx,
        "generated_tokens": res.stats.generated_tokens,
        "wall_s": wall,
        "llama_kv_mib": mib(r"CPU KV buffer size =\s*([\d.]+) MiB"),
        "llama_compute_mib": mib(r"CPU compute buffer size =\s*([\d.]+) MiB"),
        "llama_output_mib": mib(r"CPU\s+output buffer size =\s*([\d.]+) MiB"),
        "llama_weights_mib": sum(
            float(x)
            for x in re.findall(r"(?:CPU_Mapped|CPU_REPACK|CPU) model buffer size =\s*([\d.]+) MiB", text)
        ),
    }


def _run_child(args: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="Write the JSON here as well as to stdout.")
    ap.add_argument("--dir", default=str(Path.home() / ".cache" / "edge_ms" / "bench"))
    ap.add_argument(
        "--steps", type=int, default=4, help="Decode steps per generation before it is cut short."
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from edge_ms.plan import RUNTIME_BYTES, shape_estimate, shape_from_gguf

    t0 = time.perf_counter()
    gguf_path, head_path = write_model(Path(args.dir))
    made_s = time.perf_counter() - t0
    shape = shape_from_gguf(gguf_path)
    baseline = _run_child({"what": "baseline"})
    rows = []
    for n, k, kv, extra in CONFIGS:
        m = _run_child(
            {
                "what": "solve",
                "gguf": str(gguf_path),
                "head": str(head_path),
                "n": n,
                "max_new_tokens": k,
                "kv_type": kv,
                "extra_bufts": extra,
                "prompt_words": PROMPT_WORDS,
                "steps": args.steps,
            }
        )
        est = shape_estimate(shape, m["n_ctx"], n, kv, m["prompt_tokens"])
        measured = m["peak_kib"] * 1024
        parts = {
            p: getattr(est, p)
            for p in ("weights", "kv_cache", "compute", "outputs", "tap", "head", "runtime")
        }
        rows.append(
            {
                "n": n,
                "max_new_tokens": k,
                "kv_type": kv,
                "extra_bufts": extra,
                **m,
                "estimate_bytes": est.total,
                "estimate_parts": parts,
                "measured_bytes": measured,
                "error": (est.total - measured) / measured,
            }
        )
        print(
            f"n={n:>2} k={k:>5} {kv:>4} repack={extra!s:>5}: estimate {est.total / 2**30:.3f} GiB, "
            f"measured {measured / 2**30:.3f} GiB (load peak {m['load_peak_kib'] / 2**20:.3f}), "
            f"error {rows[-1]['error']:+.1%}",
            file=sys.stderr,
        )
    errors = [abs(r["error"]) for r in rows]
    report = {
        "model": str(gguf_path),
        "model_bytes": shape.file_bytes,
        "model_written_s": made_s,
        "baseline_peak_bytes": baseline["peak_kib"] * 1024,
        "runtime_bytes_assumed": RUNTIME_BYTES,
        "configs": rows,
        "max_abs_error": max(errors),
        "mean_abs_error": sum(errors) / len(errors),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        from edge_ms.atomic import write_text

        write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
