"""Training the SPRM head with the self-supervised process reward (SPR) loss, in numpy.

The head is Linear(c, 2c) - ReLU - Dropout(0.5) - Linear(2c, 1); its weights use the
PyTorch state-dict names ("0.weight" [2c, c], "0.bias" [2c], "3.weight" [1, 2c],
"3.bias" [1]) so that a trained head exports like a published one.

The loss (docs/method.md, section 6): every scored step of a trajectory takes the
trajectory's label y (1: the final answer is right). A step counts only when its logit
already agrees with y; kept positive and negative steps are balanced by their counts; the
loss is the weighted mean BCE-with-logits. The agreement filter and the weights are masks
and constants: no gradient flows through them.

Why training can learn nothing, and what is done about it. The filter drops every step
whose logit has the wrong sign, and nothing pulls a dropped step back: a head whose logits
all have one sign keeps only that label's steps and just pushes them further (the test
``test_one_sided_logits_learn_nothing_without_warmup`` shows it). Worse, positives weigh
1.5 times the negatives in total, so the output bias drifts up; each negative that crosses
zero leaves the loss for good, and on frozen features (we do not train the backbone; the
published recipe trains it jointly, though with its gradient into the backbone scaled by
1e-4) the run can end with every step kept positive and every score near 1. So: features
are standardised per dimension (the standardisation is folded into the first layer at the
end, exactly, so the head still takes raw hidden states), a fresh head starts with
PyTorch's default init in that standardised space, so initial logits spread over both signs
and each label starts with a random half of its steps kept, and ``warmup_epochs`` of the
class-balanced BCE without the filter can precede the SPR loss. The measurements behind
this and behind the defaults are in docs/experiments.md (sections 1 and 2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_ms.atomic import atomic_write

__all__ = [
    "HeadWeights",
    "EpochLog",
    "init_head",
    "head_logits",
    "step_scores",
    "trajectory_scores",
    "auc",
    "spr_loss_and_grads",
    "train_head",
    "plot_scores",
    "SCORE_FLOOR",
]

HeadWeights = dict[str, np.ndarray]

SCORE_FLOOR = 1e-10  # step scores are clamped to this before the geometric mean
_POS_WEIGHT = 1.5  # the published class-balance factor for positive steps


def init_head(c: int, seed: int, out_scale: float = 1.0) -> HeadWeights:
    """A fresh head: PyTorch's default Linear init, the output layer scaled by ``out_scale``.

    ``train_head`` applies it to standardised features, where the default scale spreads the
    initial logits over both signs (see the module docstring for why that matters).
    """
    rng = np.random.default_rng(seed)
    b1, b2 = 1.0 / math.sqrt(c), 1.0 / math.sqrt(2 * c)
    return {
        "0.weight": rng.uniform(-b1, b1, (2 * c, c)).astype(np.float32),
        "0.bias": rng.uniform(-b1, b1, (2 * c,)).astype(np.float32),
        "3.weight": (out_scale * rng.uniform(-b2, b2, (1, 2 * c))).astype(np.float32),
        "3.bias": np.zeros((1,), np.float32),
    }


def head_logits(weights: HeadWeights, features: np.ndarray) -> np.ndarray:
    """Logits of the head in inference mode (no dropout), one per row of ``features`` [m, c]."""
    h = np.maximum(features @ weights["0.weight"].T + weights["0.bias"], 0.0)
    return h @ weights["3.weight"][0] + weights["3.bias"][0]


def step_scores(weights: HeadWeights, features: np.ndarray) -> np.ndarray:
    """sigmoid(head(h)) for each row of ``features``."""
    z = head_logits(weights, features).astype(np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def trajectory_scores(scores: np.ndarray, traj_ids: np.ndarray, n_traj: int | None = None) -> np.ndarray:
    """Geometric mean of the (floored) step scores of each trajectory id 0..n_traj-1; 0 without steps."""
    traj_ids = np.asarray(traj_ids, dtype=np.int64)
    n = int(traj_ids.max()) + 1 if n_traj is None else n_traj
    logs = np.log(np.maximum(np.asarray(scores, np.float64), SCORE_FLOOR))
    sums = np.bincount(traj_ids, weights=logs, minlength=n)
    counts = np.bincount(traj_ids, minlength=n)
    out = np.zeros(n)
    has = counts > 0
    out[has] = np.exp(sums[has] / counts[has])
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); nan when one class is missing."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # Average ranks over ties.
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_pos = ranks[: len(pos)].sum()
    return float((rank_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def spr_loss_and_grads(
    params: HeadWeights,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    dropout: float = 0.5,
    rng: np.random.Generator | None = None,
    agreement_filter: bool = True,
) -> tuple[float, HeadWeights]:
    """The SPR loss on ``features`` [m, c] with step labels ``labels`` [m] in {0, 1}, and its gradients.

    ``dropout`` is the drop probability on the hidden layer (inverted dropout, as PyTorch in
    training mode), with masks drawn from ``rng``; ``dropout=0`` turns it off. Computed in
    float64. When no step is kept the loss is 0 and every gradient is zero.
    ``agreement_filter=False`` keeps every step (the balanced BCE alone, for warm-up).
    """
    loss, grads, _ = _spr(
        params, features, labels, dropout=dropout, rng=rng, agreement_filter=agreement_filter
    )
    return loss, grads


def _spr(
    params: HeadWeights,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    dropout: float,
    rng: np.random.Generator | None,
    agreement_filter: bool,
    dtype: type = np.float64,
) -> tuple[float, HeadWeights, int]:
    x = np.asarray(features, dtype)
    y = np.asarray(labels, dtype)
    w0 = params["0.weight"].astype(dtype)
    b0 = params["0.bias"].astype(dtype)
    w3 = params["3.weight"].astype(dtype)
    b3 = params["3.bias"].astype(dtype)

    pre = x @ w0.T + b0
    hid = np.maximum(pre, 0.0)
    if dropout > 0.0:
        if rng is None:
            raise ValueError("dropout > 0 needs an rng for the mask")
        mask = ((rng.random(hid.shape) >= dropout) / (1.0 - dropout)).astype(dtype)
        hid = hid * mask
    else:
        mask = None
    z = hid @ w3[0] + b3[0]

    pos = y > 0.5
    if agreement_filter:
        kept = (pos & (z > 0)) | (~pos & (z < 0))
    else:
        kept = np.ones_like(pos)
    n_pos = int(np.count_nonzero(kept & pos)) + 1
    n_neg = int(np.count_nonzero(kept & ~pos)) + 1
    w = np.where(pos, _POS_WEIGHT * n_neg / (n_pos + n_neg), n_pos / (n_pos + n_neg)) * kept
    total = w.sum()
    zeros = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
    n_kept = int(np.count_nonzero(kept))
    if total <= 0.0:
        return 0.0, zeros, 0

    bce = np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))
    loss = float((w * bce).sum() / total)

    sig = np.exp(-np.logaddexp(0.0, -z))
    dz = (w * (sig - y) / total).astype(dtype)
    g_w3 = (dz @ hid)[None, :]
    g_b3 = np.array([dz.sum()])
    d_hid = np.outer(dz, w3[0])
    if mask is not None:
        d_hid = d_hid * mask
    d_pre = d_hid * (pre > 0)
    grads = {"0.weight": d_pre.T @ x, "0.bias": d_pre.sum(axis=0), "3.weight": g_w3, "3.bias": g_b3}
    return loss, grads, n_kept


@dataclass
class EpochLog:
    """What one epoch did; epoch 0 is the head before training.

    Scores are mean trajectory scores (geometric mean of step scores, dropout off) of the
    correct and the incorrect trajectories; ``nan`` where a group is empty.
    """

    epoch: int
    loss: float
    kept_fraction: float
    train_correct: float
    train_incorrect: float
    train_auc: float
    heldout_correct: float = float("nan")
    heldout_incorrect: float = float("nan")
    heldout_auc: float = float("nan")


@dataclass
class _Split:
    features: np.ndarray
    labels: np.ndarray  # per step
    traj: np.ndarray  # dense trajectory index per step, 0..n_traj-1
    traj_labels: np.ndarray  # per trajectory
    steps_of: list[np.ndarray] = field(default_factory=list)


def _split(features: np.ndarray, labels: np.ndarray, traj_ids: np.ndarray, what: str) -> _Split:
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    traj_ids = np.asarray(traj_ids)
    if features.ndim != 2 or labels.shape != (len(features),) or traj_ids.shape != (len(features),):
        raise ValueError(
            f"{what}: features must be [m, c] with labels and traj_ids of length m, got "
            f"{features.shape}, {labels.shape}, {traj_ids.shape}"
        )
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{what}: labels must be 0 or 1")
    uniq, dense = np.unique(traj_ids, return_inverse=True)
    traj_labels = np.zeros(len(uniq), np.int64)
    traj_labels[dense] = labels
    if np.any(traj_labels[dense] != labels):
        raise ValueError(f"{what}: the steps of one trajectory carry different labels")
    order = np.argsort(dense, kind="stable")
    bounds = np.searchsorted(dense[order], np.arange(len(uniq) + 1))
    steps_of = [order[bounds[i] : bounds[i + 1]] for i in range(len(uniq))]
    return _Split(features, labels.astype(np.int64), dense, traj_labels, steps_of)


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0, dtype=np.float64)
    sd = x.std(axis=0, dtype=np.float64)
    sd = np.where(sd < 1e-6, 1.0, sd)
    return mu, sd


def _to_standardised(w: HeadWeights, mu: np.ndarray, sd: np.ndarray) -> HeadWeights:
    # head(raw) == head_std((raw - mu) / sd) when W0_std = W0 * sd and b0_std = b0 + W0 @ mu.
    w0 = w["0.weight"].astype(np.float64)
    return {**w, "0.weight": w0 * sd, "0.bias": w["0.bias"] + w0 @ mu}


def _from_standardised(w: HeadWeights, mu: np.ndarray, sd: np.ndarray) -> HeadWeights:
    w0 = w["0.weight"].astype(np.float64) / sd  # fold the standardisation in, in float64
    return {**w, "0.weight": w0, "0.bias": w["0.bias"].astype(np.float64) - w0 @ mu}


def _mean_scores(w: HeadWeights, s: _Split) -> tuple[float, float, float]:
    traj = trajectory_scores(step_scores(w, s.features), s.traj, len(s.traj_labels))
    good, bad = traj[s.traj_labels == 1], traj[s.traj_labels == 0]
    mean = lambda a: float(a.mean()) if len(a) else float("nan")  # noqa: E731
    return mean(good), mean(bad), auc(traj, s.traj_labels)


def _start(features: np.ndarray, init_weights: HeadWeights | None, seed: int, out_scale: float,
           standardize: bool) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The starting parameters and the training features, in the space the head trains in.

    Float32 (the minibatch passes and Adam are memory-bound: half the bytes, half the time; a
    recipe search trains a dozen heads on ~16k steps each); the standardisation stays float64.
    """
    c = features.shape[1]
    if not standardize:
        params = init_head(c, seed, out_scale) if init_weights is None else init_weights
        return {k: np.array(v, np.float32) for k, v in params.items()}, features.astype(np.float32), None, None
    mu, sd = _standardiser(features)
    # A fresh head starts in the standardised space (that is where its init scale means
    # something); a given head is moved there exactly.
    params = init_head(c, seed, out_scale) if init_weights is None else _to_standardised(init_weights, mu, sd)
    return {k: np.array(v, np.float32) for k, v in params.items()}, ((features - mu) / sd).astype(np.float32), mu, sd


class _Adam:
    """Adam (betas 0.9 / 0.999), with ``weight_decay`` times the parameter added to each update."""

    def __init__(self, lr: float, weight_decay: float, params: dict[str, np.ndarray]) -> None:
        self.lr, self.weight_decay, self.step = lr, weight_decay, 0
        self.m1 = {k: np.zeros_like(v) for k, v in params.items()}
        self.m2 = {k: np.zeros_like(v) for k, v in params.items()}

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self.step += 1
        c1, c2 = 1 - beta1**self.step, 1 - beta2**self.step
        for k in params:  # in place: the step is memory-bound, every temporary costs a pass
            g, m1, m2, p = grads[k], self.m1[k], self.m2[k], params[k]
            m1 *= beta1
            m1 += (1 - beta1) * g
            m2 *= beta2
            m2 += (1 - beta2) * np.square(g)
            denom = np.sqrt(m2 / c2)
            denom += eps
            step = np.divide(m1, denom)
            step *= self.lr / c1
            if self.weight_decay:
                step += self.lr * self.weight_decay * p
            p -= step


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    traj_ids: np.ndarray,
    *,
    init_weights: HeadWeights | None = None,
    epochs: int = 40,
    lr: float = 1e-4,
    seed: int = 0,
    batch_trajectories: int = 32,
    dropout: float = 0.5,
    weight_decay: float = 0.0,
    warmup_epochs: int = 5,
    standardize: bool = True,
    out_scale: float = 1.0,
    heldout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    on_epoch=None,
) -> tuple[HeadWeights, list[EpochLog]]:
    """Train an SPRM head with Adam on the SPR loss; returns float32 weights and the per-epoch log.

    ``features`` [m, c] are the hidden states at the scored steps, ``labels`` [m] the label of
    each step's trajectory (0/1) and ``traj_ids`` [m] which trajectory each step belongs to;
    minibatches hold ``batch_trajectories`` whole trajectories. ``heldout`` is the same triple
    for trajectories only scored in the log. The first ``warmup_epochs`` epochs run the
    class-balanced BCE without the agreement filter. With ``standardize`` the head trains on
    per-dimension standardised features and the standardisation is folded into the first
    layer at the end, so the returned head takes raw hidden states. ``on_epoch(EpochLog)`` is
    called after each epoch. The defaults (lr 1e-4, 5 warm-up epochs) are those that trained
    best on the embedded model's arithmetic (docs/experiments.md, section 1).
    """
    tr = _split(features, labels, traj_ids, "train")
    ho = _split(*heldout, "heldout") if heldout is not None else None
    c = tr.features.shape[1]
    if init_weights is not None and init_weights["0.weight"].shape != (2 * c, c):
        raise ValueError(
            f"init_weights: first layer is {init_weights['0.weight'].shape}, features have c={c}"
        )

    params, tr_x, mu, sd = _start(tr.features, init_weights, seed, out_scale, standardize)

    def export(p: HeadWeights) -> HeadWeights:
        out = _from_standardised(p, mu, sd) if standardize else p
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def record(epoch: int, loss: float, kept: float) -> EpochLog:
        w = export(params)
        entry = EpochLog(epoch, loss, kept, *_mean_scores(w, tr))
        if ho is not None:
            entry.heldout_correct, entry.heldout_incorrect, entry.heldout_auc = _mean_scores(w, ho)
        if on_epoch is not None:
            on_epoch(entry)
        return entry

    rng = np.random.default_rng(seed)
    adam = _Adam(lr, weight_decay, params)
    log = [record(0, float("nan"), float("nan"))]
    n_traj = len(tr.traj_labels)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n_traj)
        losses, kept_steps = [], 0
        for start in range(0, n_traj, batch_trajectories):
            rows = np.concatenate([tr.steps_of[i] for i in order[start : start + batch_trajectories]])
            if len(rows) == 0:
                continue
            loss, grads, n_kept = _spr(
                params,
                tr_x[rows],
                tr.labels[rows],
                dropout=dropout,
                rng=rng,
                agreement_filter=epoch > warmup_epochs,
                dtype=np.float32,
            )
            losses.append(loss)
            kept_steps += n_kept
            adam.update(params, grads)
        log.append(
            record(epoch, float(np.mean(losses)) if losses else 0.0, kept_steps / max(1, len(tr.labels)))
        )
    return export(params), log


def plot_scores(log: list[EpochLog], path: str | os.PathLike) -> bool:
    """Plot mean trajectory score of correct vs incorrect trajectories per epoch to a PNG.

    Returns False (writing nothing) when matplotlib is not installed (``pip install
    edge-ms[train]``). The file appears whole or not at all.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path = Path(path)
    epochs = [e.epoch for e in log]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(epochs, [e.train_correct for e in log], "-", color="tab:green", label="train, correct")
    ax.plot(epochs, [e.train_incorrect for e in log], "-", color="tab:red", label="train, incorrect")
    if any(not math.isnan(e.heldout_correct) for e in log):
        ax.plot(epochs, [e.heldout_correct for e in log], "--", color="tab:green", label="held-out, correct")
        ax.plot(
            epochs, [e.heldout_incorrect for e in log], "--", color="tab:red", label="held-out, incorrect"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean trajectory score")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("SPRM head: scores of correct vs incorrect trajectories")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    try:
        with atomic_write(path, binary=True) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return True
