"""SPR loss and gradients against torch autograd; training separates correct from incorrect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_ms.train import (
    auc,
    head_logits,
    init_head,
    plot_scores,
    spr_loss_and_grads,
    step_scores,
    train_head,
    trajectory_scores,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "tiny-qwen2.npz"


def _torch_spr(weights, features, labels, mask=None):
    """The SPR loss written independently in torch (float64); returns (loss, grads by state-dict key)."""
    c = features.shape[1]
    head = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * c, 1)).double()
    head.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in weights.items()})
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    hid = head[1](head[0](x))
    if mask is not None:
        hid = hid * torch.tensor(mask)
    z = head[3](hid)[:, 0]
    with torch.no_grad():
        kept = ((z > 0) & (y == 1)) | ((z < 0) & (y == 0))
        p = (kept & (y == 1)).sum().item() + 1
        q = (kept & (y == 0)).sum().item() + 1
        w = torch.where(y == 1, 1.5 * q / (p + q), p / (p + q)) * kept.double()
    if w.sum() == 0:
        return 0.0, {k: np.zeros_like(v, dtype=np.float64) for k, v in weights.items()}
    bce = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    loss = (w * bce).sum() / w.sum()
    loss.backward()
    grads = {name: prm.grad.numpy().copy() for name, prm in head.named_parameters()}
    return loss.item(), grads


def _fixture_features() -> np.ndarray | None:
    """Real hidden-state rows (layer n_layer-2 of the tiny Qwen2 fixture), when the fixture exists."""
    if not FIXTURE.exists():
        return None
    with np.load(FIXTURE) as data:
        hidden = [data[k] for k in sorted(data.files) if k.startswith("hidden_")]
    if not hidden:
        return None
    return np.concatenate(hidden).astype(np.float32)


def _sources():
    rng = np.random.default_rng(0)
    out = [("random", rng.standard_normal((40, 24)).astype(np.float32) * 2.0)]
    fixture = _fixture_features()
    if fixture is not None:
        out.append(("tiny-qwen2", fixture[:64]))
    return out


def _weights(c, seed):
    rng = np.random.default_rng(seed)
    return {
        "0.weight": (rng.standard_normal((2 * c, c)) / np.sqrt(c)).astype(np.float32),
        "0.bias": (0.1 * rng.standard_normal(2 * c)).astype(np.float32),
        "3.weight": (rng.standard_normal((1, 2 * c)) / np.sqrt(2 * c)).astype(np.float32),
        "3.bias": np.array([0.05], np.float32),
    }


@pytest.mark.parametrize("source", _sources(), ids=lambda s: s[0])
@pytest.mark.parametrize("case", ["all_kept", "some_filtered", "none_kept"])
def test_loss_and_grads_match_torch(source, case):
    _, x = source
    c = x.shape[1]
    w = _weights(c, seed=3)
    z = head_logits(w, x)
    agree = (z > 0).astype(np.int64)
    if case == "all_kept":
        y = agree
    elif case == "none_kept":
        y = 1 - agree
    else:
        y = np.random.default_rng(5).integers(0, 2, len(x))
        kept = (z > 0) == (y == 1)
        assert 0 < kept.sum() < len(x)  # the case really mixes kept and filtered steps
    loss, grads = spr_loss_and_grads(w, x, y, dropout=0.0)
    ref_loss, ref_grads = _torch_spr(w, x, y)
    if case == "none_kept":
        assert loss == 0.0
        assert all(not g.any() for g in grads.values())
    else:
        assert loss > 0.0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=0)
    for k in ref_grads:
        assert grads[k].shape == w[k].shape
        scale = np.abs(ref_grads[k]).max()
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5 * scale + 1e-300)


def test_dropout_mask_applies_to_hidden_layer():
    """With dropout the numpy loss equals torch's with the same (replayed) inverted-dropout mask."""
    x = np.random.default_rng(1).standard_normal((30, 16)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, 2, 30)
    w = _weights(16, seed=4)
    loss, grads = spr_loss_and_grads(w, x, y, dropout=0.5, rng=np.random.default_rng(9))
    mask = (np.random.default_rng(9).random((30, 32)) >= 0.5) / 0.5
    ref_loss, ref_grads = _torch_spr(w, x, y, mask=mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in ref_grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5 * np.abs(ref_grads[k]).max())
    no_drop, _ = spr_loss_and_grads(w, x, y, dropout=0.0)
    assert no_drop != pytest.approx(loss)


def test_filter_weights_and_not_gradients():
    """Positive steps weigh 1.5*Q/(P+Q): on one kept positive and one kept negative step the loss is
    (1.5*Q/(P+Q)*bce_pos + P/(P+Q)*bce_neg) / (sum of weights), with P = Q = 2."""
    c = 4
    w = {
        "0.weight": np.eye(2 * c, c, dtype=np.float32),
        "0.bias": np.zeros(2 * c, np.float32),
        "3.weight": np.ones((1, 2 * c), np.float32),
        "3.bias": np.array([-1.0], np.float32),
    }
    x = np.array([[3, 0, 0, 0], [0.5, 0, 0, 0], [0.1, 0, 0, 0]], np.float32)  # logits 2, -0.5, -0.9
    y = np.array([1, 0, 1])  # the third step disagrees and is left out
    loss, _ = spr_loss_and_grads(w, x, y, dropout=0.0)
    bce = lambda z, t: np.log1p(np.exp(-z)) if t else np.log1p(np.exp(z))  # noqa: E731
    wp, wn = 1.5 * 2 / 4, 2 / 4
    assert loss == pytest.approx((wp * bce(2.0, 1) + wn * bce(-0.5, 0)) / (wp + wn), rel=1e-12)


def _toy(n_traj, steps, c, seed, sep=1.5):
    """Trajectories whose step features shift along one direction when the trajectory is correct."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_traj)
    direction = np.zeros(c)
    direction[0] = sep
    feats, ys, ids = [], [], []
    for t, lab in enumerate(labels):
        for _ in range(steps):
            feats.append(rng.standard_normal(c) * 3.0 + 40.0 + (direction if lab else -direction))
            ys.append(lab)
            ids.append(1000 + 7 * t)  # arbitrary, non-dense ids
    return np.array(feats, np.float32), np.array(ys), np.array(ids)


def test_training_drives_correct_and_incorrect_scores_apart(tmp_path):
    train = _toy(120, 4, 16, seed=0, sep=3.0)
    held = _toy(60, 4, 16, seed=1, sep=3.0)
    # The SPR loss alone (no warm-up): on well-separated features it finds the split by itself.
    weights, log = train_head(
        *train, epochs=40, lr=1e-2, seed=0, batch_trajectories=16, heldout=held, warmup_epochs=0
    )
    steps_taken = 40 * int(np.ceil(120 / 16))
    assert steps_taken >= 300
    first, last = log[0], log[-1]
    # A fresh head scores everything about the same; a trained one tells the two apart on unseen data.
    assert abs(first.heldout_correct - first.heldout_incorrect) < 0.05
    assert last.heldout_correct - last.heldout_incorrect > 0.4
    assert last.heldout_auc > 0.95
    assert [e.epoch for e in log] == list(range(41))
    # The returned head takes raw features (the standardisation is folded into its first layer).
    traj = trajectory_scores(step_scores(weights, held[0]), np.unique(held[2], return_inverse=True)[1])
    lab = held[1][np.unique(held[2], return_index=True)[1]]
    assert auc(traj, lab) == pytest.approx(last.heldout_auc)
    assert all(v.dtype == np.float32 for v in weights.values())
    png = tmp_path / "curve.png"
    if plot_scores(log, png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_same_seed_same_head():
    data = _toy(40, 3, 8, seed=2)
    a, _ = train_head(*data, epochs=3, seed=7)
    b, _ = train_head(*data, epochs=3, seed=7)
    c, _ = train_head(*data, epochs=3, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_zero_epochs_returns_the_initial_head():
    """Standardising and folding back is exact: without training the head is unchanged."""
    x, y, ids = _toy(20, 3, 8, seed=3)
    init = init_head(8, seed=1, out_scale=1.0)
    out, log = train_head(x, y, ids, init_weights=init, epochs=0)
    for k in init:
        np.testing.assert_allclose(out[k], init[k], rtol=1e-5, atol=1e-5)
    assert len(log) == 1


def test_one_sided_logits_learn_nothing_without_warmup():
    """The agreement filter's trap: with every logit > 0 only positive steps are kept, negatives are
    never pushed down and held-out ranking stays near chance; a filter-free warm-up gets out of it."""
    train = _toy(120, 4, 16, seed=4, sep=3.0)
    held = _toy(60, 4, 16, seed=5, sep=3.0)
    init = init_head(16, seed=0, out_scale=0.01)
    init["3.bias"] = np.array([8.0], np.float32)  # every logit far on the positive side
    kw = dict(init_weights=init, epochs=12, lr=1e-2, heldout=held, batch_trajectories=16)
    _, trapped = train_head(*train, warmup_epochs=0, **kw)
    _, freed = train_head(*train, warmup_epochs=6, **kw)
    n_pos = int(train[1].sum())
    assert trapped[1].kept_fraction == pytest.approx(n_pos / len(train[1]))
    assert trapped[-1].heldout_correct - trapped[-1].heldout_incorrect < 0.05
    assert freed[-1].heldout_correct - freed[-1].heldout_incorrect > 0.3
    assert freed[-1].heldout_auc > 0.9


def test_trajectory_scores_geometric_mean_with_floor():
    s = np.array([0.25, 1.0, 0.0, 0.5])
    ids = np.array([0, 0, 1, 3])
    got = trajectory_scores(s, ids, n_traj=4)
    np.testing.assert_allclose(got, [0.5, 1e-10, 0.0, 0.5])


def test_auc_counts_ties_half():
    assert auc(np.array([0.9, 0.1, 0.5, 0.5]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)
    assert np.isnan(auc(np.array([0.3]), np.array([1])))


def test_bad_inputs_are_refused():
    x, y, ids = _toy(4, 2, 8, seed=0)
    with pytest.raises(ValueError, match="different labels"):
        train_head(x, np.r_[y[:-1], 1 - y[-1]], ids, epochs=1)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        train_head(x, y * 2, ids, epochs=1)
    with pytest.raises(ValueError, match="init_weights"):
        train_head(x, y, ids, init_weights=init_head(4, seed=0), epochs=1)
