"""Run one question on this device: print the chosen answer, tokens per second and peak memory.

    python examples/edge/run_one.py "What is 17 * 23?" --model metastone-s1-1.5b --mode low --memory 3GiB
    python examples/edge/run_one.py "..." --model DIR --n-gpu-layers 99        # Jetson: every layer on the GPU

The peak is the process's resident high-water mark (getrusage), printed beside edge_ms.plan's
estimate for the same run. On a Jetson, memory the CUDA driver maps for the GPU is not in
the process's RSS; watch `tegrastats` there, or trust the estimate (the GPU shares the RAM).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from edge_ms.cli import _parse_size
from edge_ms.errors import EdgeMSError
from edge_ms.model import DeviceSettings, default_extra_bufts
from edge_ms.plan import shape_estimate, shape_from_model
from edge_ms.reasoner import Reasoner


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument(
        "--model", "-m", default=None, help="Model directory, store name or GGUF (default: embedded)."
    )
    ap.add_argument("--head", default=None, help="SPRM head (.sprm.onnx) when --model is a bare GGUF.")
    ap.add_argument("--quant", default=None, help="Which GGUF of the model to use (e.g. q4_k_m).")
    ap.add_argument("--mode", default="low", help="low / medium / high = 2 / 8 / 32 trajectories.")
    ap.add_argument("--n", type=int, default=None, help="Number of trajectories (overrides --mode).")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores).")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="Layers to offload (Jetson: 99 = all).")
    ap.add_argument("--kv-type", default="f16", help="f16 or q8_0.")
    ap.add_argument(
        "--extra-bufts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="llama.cpp weight repacking (default: on unless the build has AMX).",
    )
    ap.add_argument("--memory", default=None, help="Memory budget, e.g. 3GiB (refuses what would not fit).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="Do not apply the model's chat template.")
    ap.add_argument("--json", action="store_true", help="Print the figures as one JSON object.")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        settings = DeviceSettings(args.threads, args.n_gpu_layers, args.kv_type, args.extra_bufts)
        reasoner = Reasoner.load(
            args.model,
            quant=args.quant,
            head=args.head,
            settings=settings,
            memory_bytes=_parse_size(args.memory),
        )
        load_s = time.perf_counter() - t0
        result = reasoner.solve(
            args.prompt, args.mode, args.n, seed=args.seed, max_new_tokens=args.max_new_tokens, raw=args.raw
        )
    except EdgeMSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    st = result.stats
    planned = shape_estimate(
        shape_from_model(reasoner.model), st.n_ctx, result.n, args.kv_type, st.prompt_tokens
    )
    best = result.best
    repacked = settings.extra_bufts if settings.extra_bufts is not None else default_extra_bufts()
    figures = {
        "model": reasoner.model.path.name,
        "threads": settings.threads(),
        "n_gpu_layers": args.n_gpu_layers,
        "kv_type": args.kv_type,
        "repacked_weights": repacked,
        "n": result.n,
        "selected": result.selected,
        "score": best.score,
        "prompt_tokens": st.prompt_tokens,
        "generated_tokens": st.generated_tokens,
        "load_s": round(load_s, 3),
        "generate_s": round(st.total_s, 3),
        "tokens_per_s": round(st.generated_tokens / st.total_s, 2) if st.total_s else 0.0,
        "decode_share": round(st.decode_s / st.total_s, 3) if st.total_s else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "planned_bytes": planned.total,
    }
    reasoner.close()
    if args.json:
        print(json.dumps({**figures, "answer": result.answer}))
        return 0
    print(result.answer)
    print(
        f"\n{figures['model']}: {result.n} trajectories, threads={figures['threads']}, "
        f"{args.n_gpu_layers} GPU layers, KV {args.kv_type}\n"
        f"chosen #{result.selected}: score {best.score:.3f}, {len(best.step_scores)} steps, "
        f"{len(best.token_ids)} tokens ({best.finish_reason})\n"
        f"prompt {st.prompt_tokens} tokens; generated {st.generated_tokens} tokens in {st.total_s:.1f} s = "
        f"{figures['tokens_per_s']:.1f} tokens/s over all trajectories (load {load_s:.1f} s)\n"
        f"peak memory {figures['peak_rss_bytes'] / 2**20:.0f} MiB (planned {planned.total / 2**20:.0f} MiB)"
    )
    if repacked:
        # Repacking copies most weights out of the mapped file; the file pages it read stay in the
        # RSS but are clean, and the kernel drops them first when memory runs short.
        print(
            "  (with weight repacking the peak also counts the file pages the repacking read: "
            "reclaimable; --no-extra-bufts to compare)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
