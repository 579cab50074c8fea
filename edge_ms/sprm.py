"""Adapting an SPRM head to a backbone and a domain: sample with the runtime, label, train, export.

``train_sprm`` is what ``edge-ms train-sprm`` runs. Trajectories are sampled by the same
engine and the same tap that serve users, so the head trains on exactly the hidden states it
will see; each trajectory is labelled by whether its final answer is right (math-verify),
truncated ones are left out (docs/method.md, section 6), and the head is trained with the SPR
loss in numpy (``edge_ms.train``). ``calibrate_sprm`` (``edge-ms calibrate``) samples labelled
problems the same way and stores a calibration of the trajectory scores in a head
(``edge_ms.calibrate``); ``train_sprm`` fits one too, on validation problems it did not train on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_ms.answers import extract_answer, is_correct
from edge_ms.atomic import atomic_write
from edge_ms.calibrate import FitReport, ece, fit, plot_reliability
from edge_ms.engine import Engine
from edge_ms.errors import EdgeMSError, fail
from edge_ms.head import Head, HeadSpec, check_backbone, load_head, write_head
from edge_ms.model import DeviceSettings, Model
from edge_ms.sampling import SamplingParams
from edge_ms.score import trajectory_score
from edge_ms.select import best_of_n, majority_vote, weighted_vote
from edge_ms.tap import MAX_LAYERS
from edge_ms.tasks import Problem, chat_messages
from edge_ms.train import EpochLog, auc, init_head, plot_scores, step_scores, train_head

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One trajectory of one problem, as training and evaluation need it."""

    problem: int
    text: str
    finish_reason: str
    correct: bool
    answer_key: str | None
    rows: np.ndarray  # [steps, c] hidden states of the scored positions
    n_tokens: int
    score: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


def default_spec(model: Model, delimiter: str | None = None, layer: int | None = None) -> HeadSpec:
    """The spec of a new head for ``model``: its think markers if it has them, and its step delimiter.

    MetaStone models delimit steps with ".\\n\\n" inside a think block; a plain chat model
    (such as the embedded default) writes one step per line, so the newline is the default there.
    """
    think_start = _single_token(model, "<think>")
    think_end = _single_token(model, "</think>")
    if delimiter is None:
        delimiter = ".\n\n" if think_start is not None else "\n"
    ids = model.tokenize(delimiter, parse_special=False)
    if len(ids) != 1:
        raise EdgeMSError(f"--delimiter {delimiter!r}: must be a single token of {model.path.name}, got {ids}")
    layer = model.n_layer - 2 if layer is None else layer
    if not 0 <= layer < model.n_layer:
        raise EdgeMSError(f"--layer {layer}: {model.path.name} has {model.n_layer} layers")
    return HeadSpec(layer=layer, hidden_size=model.n_embd, step_delimiter_ids=tuple(ids), think_start_id=think_start,
                    think_end_id=think_end, backbone_fingerprint=model.fingerprint)


def _single_token(model: Model, text: str) -> int | None:
    ids = model.tokenize(text, parse_special=True)
    return ids[0] if len(ids) == 1 and model.token_text(ids[0]) == text else None


def sample(
    engine: Engine,
    problems: Sequence[Problem],
    n: int,
    seed: int,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    on_problem: Callable[[int, list[Sample]], None] | None = None,
    workers: int = 1,
    cache: str | Path | None = None,
) -> list[Sample]:
    """``n`` trajectories per problem with the engine's tap keeping the step rows.

    Problem ``i`` is posed as :func:`request` does (trajectory j's seed adds j).
    ``workers`` > 1 samples problems on that many engines in threads (llama.cpp runs without
    the GIL), the threads of ``engine``'s model split between them: on a small model a decode
    step is compute-bound, so two one-thread contexts beat one two-thread context. The
    samples are the same whatever ``workers``, up to llama.cpp's batch-composition noise.
    ``cache``: a directory keeping each problem's samples (keyed by backbone, tapped layers,
    prompt, seed and sampling settings), so an interrupted run resumes where it stopped.
    With ``engine.extra_layers``, each sample's rows hold every tapped layer side by side, in
    the order of :func:`tapped_layers` (:func:`at_layer` takes one out).
    """
    if workers < 1:
        raise EdgeMSError(f"--workers {workers}: must be at least 1")
    workers = min(workers, max(len(problems), 1))
    if workers == 1:
        return _sample_shard(engine, list(enumerate(problems)), n, seed, max_new_tokens, temperature, top_p,
                             on_problem, cache)
    threads = max(1, (engine.n_threads or engine.model.settings.threads()) // workers)
    engines = [Engine(engine.model, engine.head, keep_rows=True, n_threads=threads, extra_layers=engine.extra_layers)
               for _ in range(workers)]
    indexed = list(enumerate(problems))
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(_sample_shard, e, indexed[w::workers], n, seed, max_new_tokens, temperature, top_p,
                            on_problem, cache)
                for w, e in enumerate(engines)
            ]
            try:
                shards = [f.result() for f in futures]
            except BaseException:
                for e in engines:  # Ctrl-C or a failing shard: stop the others at their next step
                    e.abort.set()
                raise
    finally:
        for e in engines:
            e.close()
    return sorted((s for shard in shards for s in shard), key=lambda s: s.problem)


def request(model: Model, problem: Problem, i: int, seed: int, max_new_tokens: int, temperature: float,
            top_p: float = 0.95) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling of problem ``i`` of a run: seed ``seed * 100003 + i * 101``."""
    ids = model.tokenize(model.apply_chat_template(chat_messages(problem)), add_special=False)
    return ids, SamplingParams(temperature=temperature, top_p=top_p, repetition_penalty=1.0,
                               seed=seed * 100_003 + i * 101, max_new_tokens=max_new_tokens)


def _sample_shard(engine, indexed, n, seed, max_new_tokens, temperature, top_p, on_problem, cache):
    model = engine.model
    keep = engine.keep_rows
    engine.keep_rows = True
    out: list[Sample] = []
    try:
        for i, prob in indexed:
            ids, params = request(model, prob, i, seed, max_new_tokens, temperature, top_p)
            path = _cache_path(cache, engine, ids, n, params)
            got = load_samples(path, i) if path is not None and path.exists() else None
            for s in got or ():  # the cache is keyed by prompt, not by answer: label again
                s.correct = is_correct(s.text, prob.answer)
            if got is None:
                trajs = next(ev.trajectories for ev in engine.generate(ids, n, params) if ev.kind == "done")
                got = []
                for t in trajs:
                    text = t.decoded()
                    got.append(
                        Sample(i, text, t.finish_reason, is_correct(text, prob.answer), extract_answer(text),
                               _sorted_rows(engine, t.step_rows()), len(t.tokens), t.score())
                    )
                if path is not None:
                    save_samples(path, got)
            out.extend(got)
            if on_problem is not None:
                on_problem(i, got)
    finally:
        engine.keep_rows = keep
    return out


def tapped_layers(engine: Engine) -> list[int]:
    """The layers an engine's samples hold, in the order their rows put them side by side."""
    return sorted({engine.layer, *engine.extra_layers})


def _sorted_rows(engine: Engine, rows: np.ndarray) -> np.ndarray:
    """Step rows from the engine's tap order (head's layer first) to :func:`tapped_layers` order."""
    c = engine.model.n_embd
    order = [engine.layer, *engine.extra_layers]
    k = len(order)
    rows = rows.reshape(-1, k, c)
    return rows[:, [order.index(layer) for layer in tapped_layers(engine)], :].reshape(-1, k * c)


def at_layer(samples: Sequence[Sample], layers: Sequence[int], layer: int) -> list[Sample]:
    """The samples with the rows of ``layer`` alone (``layers``: what their rows hold, in order)."""
    if layer not in layers:
        raise EdgeMSError(f"layer {layer} was not tapped while sampling (tapped: {list(layers)})")
    k = list(layers).index(layer)
    out = []
    for s in samples:
        c = s.rows.shape[1] // len(layers)
        out.append(replace(s, rows=s.rows[:, k * c : (k + 1) * c]))
    return out


def _cache_path(cache, engine: Engine, ids: list[int], n: int, params: SamplingParams) -> Path | None:
    if cache is None:
        return None
    spec = engine.head.spec
    key = json.dumps([engine.model.fingerprint, tapped_layers(engine), list(spec.step_delimiter_ids), spec.think_start_id,
                      spec.think_end_id, ids, n, asdict(params)], default=str)
    return Path(cache) / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def save_samples(path: str | Path, samples: Sequence[Sample]) -> None:
    """One problem's samples as a compressed .npz (text and labels as JSON, step rows as arrays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = [{k: getattr(s, k) for k in ("text", "finish_reason", "correct", "answer_key", "n_tokens")}
            for s in samples]
    arrays_ = {f"rows_{i}": s.rows for i, s in enumerate(samples)}
    with atomic_write(path, binary=True) as f:
        np.savez_compressed(f, meta=json.dumps(meta), **arrays_)


def load_samples(path: str | Path, problem: int) -> list[Sample] | None:
    """What save_samples wrote, as samples of ``problem``; None when the file is unreadable."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return [Sample(problem=problem, rows=data[f"rows_{i}"], **m) for i, m in enumerate(meta)]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: ignoring unreadable cached samples (%s)", path, err)
        return None


def arrays(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [m, c], step labels [m], trajectory ids [m]) of the finished trajectories with steps."""
    feats, labels, traj = [], [], []
    for j, s in enumerate(samples):
        if not s.finished or len(s.rows) == 0:
            continue  # truncated trajectories have no trustworthy label (docs/method.md, section 6)
        feats.append(s.rows)
        labels.append(np.full(len(s.rows), float(s.correct)))
        traj.append(np.full(len(s.rows), j))
    if not feats:
        raise EdgeMSError("no finished trajectory with a scored step: raise --max-new-tokens or check --delimiter")
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels), np.concatenate(traj)


def best_indices(samples: Sequence[Sample], n: int | None = None) -> list[int]:
    """Index into ``samples`` of the trajectory best-of-N selects for each problem (of its first ``n``)."""
    by_problem: dict[int, list[int]] = {}
    for j, s in enumerate(samples):
        by_problem.setdefault(s.problem, []).append(j)
    return [idx[best_of_n([samples[j] for j in idx[:n]])] for idx in by_problem.values()]


def rescore(samples: Sequence[Sample], score_rows: Callable[[np.ndarray], np.ndarray]) -> None:
    """Set each sample's trajectory score from its step rows, as the runtime scores a trajectory."""
    for s in samples:
        s.score = trajectory_score(score_rows(s.rows).tolist() if len(s.rows) else [])


def evaluate(samples: Sequence[Sample], n: int, seed: int = 0, subsets: int = 1) -> dict:
    """Accuracy of each way to pick one of ``n`` trajectories per problem.

    With more trajectories per problem than ``n``, ``subsets`` random subsets of size ``n``
    are drawn per problem (the usual best-of-N estimate); the figures are their means.
    """
    by_problem: dict[int, list[Sample]] = {}
    for s in samples:
        by_problem.setdefault(s.problem, []).append(s)
    rng = np.random.default_rng(seed)
    hits = {k: [] for k in ("pass@1", "sprm_best", "majority", "sprm_weighted", "random", "oracle")}
    for group in by_problem.values():
        if len(group) < n:
            raise EdgeMSError(f"evaluate: {len(group)} trajectories for a problem, need {n}")
        draws = [range(n)] if len(group) == n else [rng.choice(len(group), n, replace=False) for _ in range(subsets)]
        for idx in draws:
            cands = [group[i] for i in idx]
            hits["pass@1"].append(np.mean([c.correct for c in cands]))
            hits["sprm_best"].append(cands[best_of_n(cands)].correct)
            hits["majority"].append(cands[majority_vote(cands)].correct)
            hits["sprm_weighted"].append(cands[weighted_vote(cands)].correct)
            hits["random"].append(cands[int(rng.integers(n))].correct)
            hits["oracle"].append(any(c.correct for c in cands))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    scores = np.array([s.score for s in samples])
    labels = np.array([s.correct for s in samples], dtype=float)
    out["auc"] = auc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
    out["problems"] = len(by_problem)
    return out


@dataclass
class TrainConfig:
    n: int = 8
    seed: int = 0
    max_new_tokens: int = 256
    temperature: float = 0.7
    epochs: int = 40
    lr: float = 1e-4
    warmup_epochs: int = 5
    delimiter: str | None = None
    layer: int | None = None  # the one layer to tap; None: choose among candidate_layers
    workers: int = 1
    # What train_sprm chooses among on validation problems (choose_recipe); one value each: no choice.
    candidate_layers: tuple[int, ...] = ()  # (): n_layer // 2, 3 * n_layer // 4 and n_layer - 2
    losses: tuple[str, ...] = ("spr", "bce", "bce+spr")


# Warm-up epochs of class-balanced BCE (no agreement filter) before the SPR loss, per loss name.
LOSSES = {"spr": lambda config: 0, "bce": lambda config: config.epochs,
          "bce+spr": lambda config: config.warmup_epochs}


@dataclass(frozen=True)
class Recipe:
    """How a head is trained: tapped layer, loss, and how much of the sampled data it sees."""

    layer: int
    loss: str  # a key of LOSSES
    problem_share: float = 1.0  # the first this share of the training problems
    samples: int | None = None  # trajectories per problem (the first ones); None: all


def default_recipe(layers: Sequence[int], config: TrainConfig) -> Recipe:
    """What trains when nothing can be chosen: the deepest candidate layer, warm-up then SPR."""
    return Recipe(max(layers), "bce+spr" if "bce+spr" in config.losses else config.losses[0])


def candidate_layers(model: Model, config: TrainConfig) -> list[int]:
    """The layers to tap while sampling: ``config.layer`` alone, or the candidates to choose among."""
    n = model.n_layer
    if config.layer is not None:
        option, layers = "--layer", [config.layer]
    else:
        option = "--layers"
        layers = sorted(set(config.candidate_layers or {min(k, n - 2) for k in (n // 2, 3 * n // 4, n - 2)}))
    bad = [layer for layer in layers if not 0 <= layer < n - 1]
    if bad:
        raise EdgeMSError(f"{option} {','.join(map(str, bad))}: {model.path.name} has {n} layers (choose 0 to {n - 2})")
    if len(layers) > MAX_LAYERS:
        raise EdgeMSError(f"--layers: at most {MAX_LAYERS} candidate layers, got {len(layers)}")
    return layers


def train_recipe(samples: Sequence[Sample], layers: Sequence[int], recipe: Recipe, config: TrainConfig,
                 init_weights: dict | None = None, heldout: tuple | None = None, on_epoch=None):
    """Train a head by ``recipe`` on ``samples`` (rows of ``layers``); returns (weights, epoch log)."""
    problems = sorted({s.problem for s in samples})
    keep = set(problems[: max(1, round(recipe.problem_share * len(problems)))])
    seen: dict[int, int] = {}
    picked = []
    for s in samples:
        seen[s.problem] = seen.get(s.problem, 0) + 1
        if s.problem in keep and (recipe.samples is None or seen[s.problem] <= recipe.samples):
            picked.append(s)
    x, y, t = arrays(at_layer(picked, layers, recipe.layer))
    return train_head(x, y, t, init_weights=init_weights, epochs=config.epochs, lr=config.lr, seed=config.seed,
                      warmup_epochs=LOSSES[recipe.loss](config), heldout=heldout, on_epoch=on_epoch)


def choose_recipe(train: Sequence[Sample], validation: Sequence[Sample], layers: Sequence[int],
                  config: TrainConfig, on_trial: Callable[[dict], None] | None = None,
                  init_weights: dict | None = None) -> tuple[Recipe, list[dict]]:
    """The recipe whose head ranks the validation trajectories best (AUC, then best-of-N).

    Every layer with every loss on all the data first; then the winner on half the problems
    and on half the trajectories per problem, which tells whether more data still helps (and
    a smaller share wins only if it scores better). Returns the recipe and the trials (each
    recipe with its validation figures), for the training log.
    """
    trials = []

    def trial(recipe: Recipe) -> tuple:
        try:
            weights, _ = train_recipe(train, layers, recipe, config, init_weights)
        except EdgeMSError as err:  # e.g. half the problems hold no finished trajectory: skip, keep the rest
            figures = {"error": str(err), "auc": float("nan"), "sprm_best": float("nan"),
                       "sprm_weighted": float("nan")}
        else:
            val = at_layer(validation, layers, recipe.layer)
            rescore(val, lambda rows: step_scores(weights, rows))
            figures = evaluate(val, config.n)
        trials.append({**asdict(recipe), "validation": figures})
        if on_trial is not None:
            on_trial(trials[-1])
        auc_ = figures["auc"] if figures["auc"] == figures["auc"] else -1.0
        return auc_, figures["sprm_best"] if figures["sprm_best"] == figures["sprm_best"] else -1.0

    grid = {Recipe(layer, loss): None for layer in layers for loss in config.losses}
    for recipe in grid:
        grid[recipe] = trial(recipe)
    if all(auc_ < 0 for auc_, _ in grid.values()):  # one class only on validation: nothing ranks
        return default_recipe(layers, config), trials
    best = max(grid, key=grid.get)
    for variant in (replace(best, problem_share=0.5), replace(best, samples=max(1, config.n // 2))):
        grid[variant] = trial(variant)
    return max(grid, key=grid.get), trials


@dataclass
class TrainReport:
    head: Path
    log_path: Path
    plot_path: Path | None
    config: dict
    train_trajectories: int
    heldout: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    epochs: list[EpochLog] = field(default_factory=list)
    recipe: Recipe | None = None
    trials: list[dict] = field(default_factory=list)
    calibration: CalibrationReport | None = None


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if not out.name.endswith(".sprm.onnx"):
        raise fail(out, "the head file name must end in .sprm.onnx")
    if not out.parent.is_dir():
        raise fail(out.parent, "output directory does not exist")
    return out


def _beside(out: Path, suffix: str) -> Path:
    """``NAME.sprm.onnx`` -> ``NAME<suffix>`` in the same folder."""
    return out.with_name(out.name[: -len(".sprm.onnx")] + suffix)


def _counter(on_progress, phase: str, total: int):
    done = itertools.count(1)  # problems finish out of order with several workers
    return lambda _i, _got: on_progress and on_progress(phase, next(done), total)


def _sample_phases(model: Model, spec: HeadSpec, weights: dict, phases: dict[str, tuple[Sequence[Problem], int]],
                   config: TrainConfig, on_progress, cache, layers: Sequence[int] = ()) -> dict[str, list[Sample]]:
    """Sample each phase's problems (with its seed) on a head of ``spec``: only its tap positions matter.

    ``layers``: every layer to tap (rows side by side, sorted); default: the spec's alone.
    """
    with tempfile.TemporaryDirectory() as tmp:
        boot = Path(tmp) / "start.sprm.onnx"
        write_head(boot, weights, spec)
        extra = tuple(layer for layer in layers if layer != spec.layer)
        engine = Engine(model, load_head(boot), keep_rows=True, extra_layers=extra)
        try:
            out = {}
            for phase, (problems, seed) in phases.items():
                out[phase] = sample(engine, problems, config.n, seed, config.max_new_tokens, config.temperature,
                                    workers=config.workers, cache=cache,
                                    on_problem=_counter(on_progress, phase, len(problems)))
            return out
        finally:
            engine.close()


def _start_head(model: Model, config: TrainConfig, init) -> tuple[HeadSpec, dict, list[int]]:
    """The spec and weights training starts from, and the layers to tap while sampling."""
    if init is not None:
        if config.candidate_layers:
            raise EdgeMSError("--layers: a head given with --init keeps its own layer; drop one of the two")
        start = load_head(init)
        check_backbone(start, model)
        # New weights, new calibration; a given head keeps its layer.
        return replace(start.spec, calibration=None), start.weights(), [start.spec.layer]
    layers = candidate_layers(model, config)
    return default_spec(model, config.delimiter, layers[-1]), init_head(model.n_embd, config.seed), layers


def train_sprm(
    gguf: str | Path,
    train_problems: Sequence[Problem],
    heldout_problems: Sequence[Problem],
    out: str | Path,
    config: TrainConfig,
    settings: DeviceSettings | None = None,
    init: str | Path | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    cache: str | Path | None = None,
    calib_problems: Sequence[Problem] = (),
    on_trial: Callable[[dict], None] | None = None,
) -> TrainReport:
    """Sample, choose a recipe, train and write ``out`` (the head), ``out``.train.json and ``out``.train.png.

    ``calib_problems``: validation problems (of the training split, never trained on): the
    recipe (tapped layer, loss, amount of data; :func:`choose_recipe`) is chosen on them and
    the trained head's scores are calibrated on them (:func:`calibrate_sprm`). Without them
    there is nothing to choose on: the head trains on the last candidate layer with the
    warm-up-then-SPR loss and has no calibration. ``heldout_problems`` are only scored for
    the log, never chosen on. ``cache``: a directory for the sampled trajectories (:func:`sample`).
    """
    out = _check_out(out)
    model = Model(gguf, settings)
    try:
        spec, weights, layers = _start_head(model, config, init)
        phases = {"train": (train_problems, config.seed), "held-out": (heldout_problems, config.seed + 1),
                  "validation": (calib_problems, config.seed + 2)}
        got = _sample_phases(model, spec, weights, phases, config, on_progress, cache, layers)
    finally:
        model.close()
    init_weights = weights if init is not None else None
    trials: list[dict] = []
    if got["validation"] and len(layers) * len(config.losses) > 1:
        recipe, trials = _choose(got["train"], got["validation"], layers, config, on_trial, init_weights)
    else:
        recipe = default_recipe(layers, config)
    spec = replace(spec, layer=recipe.layer)
    tr, ho, va = (at_layer(got[k], layers, recipe.layer) for k in ("train", "held-out", "validation"))
    # The held-out curve is optional: a tiny held-out set may have no finished trajectory.
    held = arrays(ho) if any(s.finished and len(s.rows) for s in ho) else None
    rescore(ho, lambda rows: step_scores(weights, rows))
    before = evaluate(ho, config.n) if ho else {}
    trained, epochs = train_recipe(got["train"], layers, recipe, config, init_weights, held, on_epoch)
    provenance = {"trained_by": "edge-ms train-sprm", "config": json.dumps(asdict(config)),
                  "recipe": json.dumps(asdict(recipe))}
    write_head(out, trained, spec, provenance=provenance)
    final = load_head(out)
    rescore(ho, final.score)
    after = evaluate(ho, config.n) if ho else {}
    report = TrainReport(out, _beside(out, ".train.json"), _beside(out, ".train.png"), asdict(config),
                         sum(s.finished and len(s.rows) > 0 for s in tr), after, before, epochs, recipe=recipe,
                         trials=trials)
    if va:
        rescore(va, final.score)
        report.calibration = _store_calibration(final, va, out, trained, provenance, "edge-ms train-sprm", config,
                                                task=f"{len(calib_problems)} validation problems")
    _write_train_log(report, spec, layers, tr)
    if not plot_scores(epochs, report.plot_path):
        report.plot_path = None
    return report


def _choose(train, validation, layers, config, on_trial, init_weights) -> tuple[Recipe, list[dict]]:
    recipe, trials = choose_recipe(train, validation, layers, config, on_trial, init_weights)
    for t in trials:
        t["chosen"] = Recipe(**{k: t[k] for k in ("layer", "loss", "problem_share", "samples")}) == recipe
    return recipe, trials


def _write_train_log(report: TrainReport, spec: HeadSpec, layers: Sequence[int], tr: Sequence[Sample]) -> None:
    used = {s.problem for s in tr}
    _write_json(report.log_path, {
        "head": str(report.head), "config": report.config, "spec": asdict(spec),
        "recipe": asdict(report.recipe), "tapped_layers": list(layers),
        "selection": {"rule": "highest validation AUC of trajectory scores, then best-of-N accuracy",
                      "trials": report.trials},
        "train": {"problems": len(used), "trajectories": len(tr), "finished": sum(s.finished for s in tr),
                  "correct": sum(s.correct for s in tr)},
        "heldout_before": report.before, "heldout_after": report.heldout,
        "calibration": report.calibration.fit.summary() if report.calibration else None,
        "epochs": [asdict(e) for e in report.epochs],
    })


@dataclass
class CalibrationReport:
    head: Path
    log_path: Path
    plot_path: Path | None
    fit: FitReport
    shown: dict = field(default_factory=dict)  # the same for the confidence solve shows (best-of-N)


def calibrate_sprm(
    gguf: str | Path,
    head_path: str | Path,
    problems: Sequence[Problem],
    out: str | Path,
    config: TrainConfig,
    settings: DeviceSettings | None = None,
    method: str = "auto",
    on_progress: Callable[[str, int, int], None] | None = None,
    cache: str | Path | None = None,
    task: str = "",
) -> CalibrationReport:
    """Sample ``problems`` with the head at ``head_path``, fit a calibration of its trajectory scores
    to whether their answers are right, and write the head with it to ``out`` (same weights), with
    ``out``.calib.json (the fit) and ``out``.calib.png (the reliability diagram) beside it.

    ``out`` may be ``head_path`` itself: it is replaced whole or not at all. Of ``config`` only the
    sampling fields (n, seed, max_new_tokens, temperature, workers) are used. ``task`` says where
    the problems come from, for the log.
    """
    out = _check_out(out)
    head = load_head(head_path)
    weights, provenance = head.weights(), head.provenance()  # read now: ``out`` may replace the file
    model = Model(gguf, settings)
    try:
        check_backbone(head, model)
        got = _sample_phases(model, replace(head.spec, calibration=None), weights,
                             {"validation": (problems, config.seed)}, config, on_progress, cache)["validation"]
    finally:
        model.close()
    rescore(got, head.score)
    return _store_calibration(head, got, out, weights, provenance, "edge-ms calibrate", config, method, task)


def _store_calibration(head: Head, samples: Sequence[Sample], out: Path, weights: dict, provenance: dict,
                       by: str, config: TrainConfig, method: str = "auto", task: str = "") -> CalibrationReport:
    """Fit on ``samples`` (scored by ``head``), write ``out`` with the calibration, the fit log and the diagram."""
    report = fit([s.score for s in samples], [s.correct for s in samples], [s.problem for s in samples], method)
    sampling = {"task": task, **{k: getattr(config, k) for k in ("n", "seed", "max_new_tokens", "temperature")}}
    provenance = {**provenance, "calibrated_by": json.dumps({"by": by, **sampling, "problems": report.problems})}
    write_head(out, weights, replace(head.spec, calibration=report.calibration), provenance=provenance)
    log_path, plot_path = _beside(out, ".calib.json"), _beside(out, ".calib.png")
    right = np.array([s.correct for s in samples], dtype=float)
    chosen = best_indices(samples)
    shown = {"problems": len(chosen), "accuracy": float(right[chosen].mean()),
             "mean_confidence": float(report.confidences[chosen].mean()),
             "ece_10_bins": ece(report.confidences[chosen], right[chosen]),
             "out_of_fold_ece_10_bins": ece(report.oof_confidences[chosen], right[chosen])}
    _write_json(log_path, {"head": out.name, "by": by, "sampling": sampling, **report.summary(),
                           "finished": sum(s.finished for s in samples), "shown_best_of_n": shown,
                           "note": "ece_10_bins: of the stored calibration on these trajectories; out_of_fold: "
                                   "each fold of problems predicted by a calibration fitted without it; "
                                   "shown_best_of_n: the confidence solve shows, each problem's best-scored "
                                   "trajectory's"})
    c = report.calibration
    title = (f"{out.name}: {c.method}\n{report.trajectories} trajectories of {report.problems} problems, "
             f"ECE {report.ece:.3f} (out of fold {report.oof_ece:.3f})")
    ok = plot_reliability(report.confidences, [s.correct for s in samples], plot_path, title)
    return CalibrationReport(out, log_path, plot_path if ok else None, report, shown)


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as f:
        json.dump(_finite(data), f, indent=1, default=str)


def _finite(value):
    """NaN (an empty group) is not JSON: write null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
