"""Long, high-effort runs: the reflective loop against raw llama.cpp loops in both KV layouts.

    python benchmarks/bench_long.py --json benchmarks/results/long.json          # N = 32 and 8, 1024 new tokens
    python benchmarks/bench_long.py --n 8 --new-tokens 128 --runs 1 --json /tmp/long.json   # a quick look
    python benchmarks/bench_long.py ... --json FILE --resume     # add runs to those FILE already holds

Every run is one fresh subprocess (so its peak RSS is its own), and the variants are interleaved
run by run in rotating order: each round of runs sees the same neighbours on a shared machine.
Every variant decodes the same prompt (token ids) for N sequences of exactly ``--new-tokens``
tokens (end-of-generation tokens are never drawn, as with llama.cpp's --ignore-eos), with the
same sampler chain (edge_ms.sampling.make_sampler) and seeds.

Variants:
  reflective-unified  Engine.generate: one KV pool shared by all sequences (the layout of
                      every release before --kv-layout), tap + on-the-fly step scoring
  reflective-streams  the same loop with one KV stream per sequence
  raw-unified         a plain batched llama_decode loop, one shared KV pool, Python sampling
  raw-streams         the same raw loop, one KV stream per sequence (prompt copied to each)

Reported per variant: median tokens/s over the run, median time per decode step in each eighth
of the run (attention cost grows with length), peak RSS; and ratios of medians side by side.
``--kv-layout auto`` (the default) resolves to one of the two layouts (edge_ms.plan.auto_layout);
the JSON names which, and ``auto_*`` ratios use that variant.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # see bench_runtime.py

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

VARIANTS = ("reflective-unified", "reflective-streams", "raw-unified", "raw-streams")
SEGMENTS = 8
# Text without digits, repeated to the prompt length: the prompt's content does not matter here.
PROMPT_TEXT = ("Tell a long story about a lighthouse keeper who finds a strange map washed up on the "
               "shore, and what happens when she follows it across the sea to an island. ")


def _prompt_ids(model, n_tokens: int) -> list[int]:
    ids = model.tokenize(PROMPT_TEXT * (n_tokens // 8 + 1), add_special=True)
    return ids[:n_tokens]


def _segments(step_times: list[float]) -> list[float]:
    """Median milliseconds per decode step in each eighth of the run."""
    k = max(1, len(step_times) // SEGMENTS)
    return [round(1000 * statistics.median(step_times[i * k : (i + 1) * k] or [0.0]), 2) for i in range(SEGMENTS)]


def run_reflective(reasoner, ids: list[int], n: int, new_tokens: int, seed: int, layout: str) -> dict:
    from edge_ms.engine import Stats
    from edge_ms.sampling import SamplingParams

    params = SamplingParams(seed=seed, max_new_tokens=new_tokens, ignore_eos=True)
    stats = Stats()
    stamps: list[float] = []
    seen = 0
    t0 = time.perf_counter()
    for ev in reasoner.engine.generate(ids, n, params, stats=stats, kv_layout=layout):
        if ev.kind == "token" and ev.n_tokens > seen:  # the first token of a new round
            seen = ev.n_tokens
            stamps.append(time.perf_counter())
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"wall_s": wall, "tokens": stats.generated_tokens, "tokens_per_s": stats.generated_tokens / wall,
            "decode_s": stats.decode_s, "sample_s": stats.sample_s, "score_s": stats.score_s,
            "kv_layout": stats.kv_layout, "n_ctx": stats.n_ctx, "ms_per_step_by_eighth": _segments(steps),
            "first_tokens": [t.tokens[:8] for t in ev.trajectories]}


def run_raw(model, ids: list[int], n: int, new_tokens: int, seed: int, layout: str) -> dict:
    """The plain batched loop (llama.cpp's examples/batched): decode, sample each sequence, repeat."""
    import llama_cpp

    from edge_ms.model import KV_TYPES
    from edge_ms.plan import context_cells
    from edge_ms.sampling import SamplingParams, make_sampler

    params = SamplingParams(seed=seed, max_new_tokens=new_tokens, ignore_eos=True)
    p = llama_cpp.llama_context_default_params()
    n_batch = max(512, n)
    p.n_ctx = context_cells(len(ids), n, new_tokens, layout)
    p.n_batch = p.n_ubatch = n_batch
    p.n_seq_max, p.kv_unified = n, layout == "unified"
    p.n_threads = p.n_threads_batch = model.settings.threads()
    p.type_k = p.type_v = KV_TYPES[model.settings.kv_type]
    p.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.ptr, p)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def decode(items):
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    t0 = time.perf_counter()
    decode([(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)])
    for seq in range(1, n):
        llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
    samplers = [make_sampler(params, model.n_vocab, seed + i, ids, model.eog_ids) for i in range(n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    index = [len(ids) - 1] * n  # each sequence's logits in the last batch
    stamps = []
    while True:
        stamps.append(time.perf_counter())
        for s in range(n):
            tokens[s].append(llama_cpp.llama_sampler_sample(samplers[s], ctx, index[s]))
        if len(tokens[0]) >= new_tokens:
            break
        decode([(tokens[s][-1], len(ids) + len(tokens[s]) - 1, s, True) for s in range(n)])
        index = list(range(n))
    wall = time.perf_counter() - t0
    for smp in samplers:
        llama_cpp.llama_sampler_free(smp)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    total = n * new_tokens
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"wall_s": wall, "tokens": total, "tokens_per_s": total / wall, "kv_layout": layout,
            "n_ctx": context_cells(len(ids), n, new_tokens, layout), "ms_per_step_by_eighth": _segments(steps),
            "first_tokens": [t[:8] for t in tokens]}


def one(args) -> None:
    """Runs in the fresh subprocess: load the embedded model and its head, run one variant once."""
    from edge_ms.model import DeviceSettings
    from edge_ms.reasoner import Reasoner

    r = Reasoner.load(None, settings=DeviceSettings(n_threads=args.threads))
    ids = _prompt_ids(r.model, args.prompt_tokens)
    kind, layout = args.one.split("-")
    if kind == "raw":
        out = run_raw(r.model, ids, args.n, args.new_tokens, args.seed, layout)
    else:
        out = run_reflective(r, ids, args.n, args.new_tokens, args.seed, layout)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["prompt_tokens"] = len(ids)
    r.close()
    print(json.dumps(out))


def _child(variant: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--n", str(n), "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--seed", str(args.seed), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]], auto: str) -> dict:
    """Medians per variant, and each ratio as the median over rounds of the two variants' runs in
    that round (side by side in time, so a round the machine was busier for counts for both)."""
    runs = {v: rs for v, rs in runs.items() if rs}  # a run stopped early keeps what it measured
    med = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in runs.items()}
    out = {v: {"tokens_per_s": round(med[v], 2),
               "tokens_per_s_runs": [round(r["tokens_per_s"], 2) for r in rs],
               "ms_per_step_by_eighth": [round(statistics.median(r["ms_per_step_by_eighth"][i] for r in rs), 2)
                                         for i in range(SEGMENTS)],
               "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
               "kv_layout": rs[0]["kv_layout"], "n_ctx": rs[0]["n_ctx"]}
           for v, rs in runs.items()}
    pairs = {"auto_vs_faster_raw": (f"reflective-{auto}", f"raw-{_faster_raw(med)}"),
             "auto_vs_reflective_unified": (f"reflective-{auto}", "reflective-unified"),
             "streams_vs_unified_raw": ("raw-streams", "raw-unified"),
             "reflective_vs_raw_unified": ("reflective-unified", "raw-unified"),
             "reflective_vs_raw_streams": ("reflective-streams", "raw-streams")}
    ratios, per_round = {}, {}
    for name, (a, b) in pairs.items():
        if a in runs and b in runs:
            by_round = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])]
            ratios[name], per_round[name] = round(statistics.median(by_round), 3), [round(r, 3) for r in by_round]
    first = [r["first_tokens"] for rs in runs.values() for r in rs[:1] if r.get("first_tokens")]
    return {"auto_layout": auto, "variants": out, "ratios": ratios, "ratios_by_round": per_round,
            "checks": {"same_first_tokens_every_variant": all(f == first[0] for f in first)}}


def _faster_raw(med: dict[str, float]) -> str:
    return max(("unified", "streams"), key=lambda lay: med.get(f"raw-{lay}", 0.0))


def _previous_runs(path: str | None, n: int) -> dict[str, list[dict]]:
    """The runs an earlier invocation stored for ``n`` (``--resume``), so a benchmark cut short
    by the machine's time limits goes on instead of starting over."""
    if not path or not os.path.exists(path):
        return {v: [] for v in VARIANTS}
    with open(path) as f:
        stored = json.load(f).get("runs", {}).get(str(n), {})
    return {v: list(stored.get(v, [])) for v in VARIANTS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32, 8], help="trajectories per run (each N in turn)")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs of every variant")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which variants to run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true", help="add to the runs already stored in --json")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from edge_ms.atomic import atomic_write
    from edge_ms.plan import auto_layout

    if args.one:
        args.n = args.n[0]
        return one(args)
    command = "python benchmarks/bench_long.py " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = {}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            previous = json.load(f)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": args.threads, "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "model": "embedded SmolLM2-135M-Instruct Q4_1",
              "commands": previous.get("commands", []) + [command],
              "by_n": previous.get("by_n", {}), "runs": previous.get("runs", {})}
    for n in args.n:
        runs = _previous_runs(args.json if args.resume else None, n)
        variants = tuple(args.variants)
        for k in range(args.runs):
            order = variants[k % len(variants):] + variants[: k % len(variants)]
            for v in order:
                runs[v].append(_child(v, n, args))
                print(f"N={n} run {k + 1}/{args.runs} {v}: {runs[v][-1]['tokens_per_s']:.1f} tok/s "
                      f"({runs[v][-1]['kv_layout']})", file=sys.stderr, flush=True)
                auto = auto_layout(runs[v][-1]["prompt_tokens"], n, args.new_tokens)
                result["by_n"][str(n)] = summarise(runs, auto)
                result["runs"][str(n)] = runs
                if args.json:  # after every run, so a long benchmark keeps what it measured
                    with atomic_write(args.json) as f:
                        f.write(json.dumps(result, indent=1) + "\n")
        if str(n) in result["by_n"]:
            print(json.dumps(result["by_n"][str(n)]["ratios"]), file=sys.stderr, flush=True)
    # Every N stored, summarised again (``--runs 0 --resume`` only does this).
    for key, stored in result["runs"].items():
        some = next(r for rs in stored.values() for r in rs)
        result["by_n"][key] = summarise(stored, auto_layout(some["prompt_tokens"], int(key), args.new_tokens))
    if args.json:
        with atomic_write(args.json) as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
