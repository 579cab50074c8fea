"""examples/desktop/app.py, headless: one question end to end on the fixture model, then a cancel."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt creates its application
pytest.importorskip("PySide6", reason="the desktop example needs the 'desktop' extra (PySide6-Essentials)")

APP = Path(__file__).resolve().parents[1] / "examples" / "desktop" / "app.py"


@pytest.fixture(scope="module")
def app_module():
    spec = importlib.util.spec_from_file_location("edge_ms_desktop_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qapp():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def wait_until(qapp, cond, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the window")
        qapp.processEvents()
        time.sleep(0.005)


@pytest.fixture
def window(app_module, qapp, converted):
    win = app_module.MainWindow(model_spec={"model": str(converted("tiny-qwen2", "f32"))})
    win.show()
    wait_until(qapp, lambda: win.ready or win.error)
    assert win.ready, win.error
    yield win
    close(qapp, win)


def close(qapp, win) -> None:
    from PySide6.QtCore import QCoreApplication, QEvent

    win.close()
    win.deleteLater()  # now, while the QApplication exists, not whenever Python collects it
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    qapp.processEvents()


def test_one_question_end_to_end(window, qapp, tmp_path):
    win = window
    win.prompt.setPlainText("What is 6 times 7?")
    win.effort.setCurrentIndex(0)  # low
    win.max_tokens.setValue(64)
    win.seed.setValue(16)  # a seed whose trajectories both reach scored steps on the fixture
    win.ask_button.click()
    assert win.busy and not win.ask_button.isEnabled() and win.cancel_button.isEnabled()
    live = []  # what the cards showed while the generation ran

    def done() -> bool:
        live.append(sum(c.s.tokens for c in win.cards))
        return not win.busy

    wait_until(qapp, done)
    assert win.error is None
    res = win.result
    assert res.mode == "low" and res.n == 2 and len(win.cards) == 2
    assert max(live) > 0  # the trajectories grew in the window before the result came

    assert any(c.step_scores for c in res.candidates)  # the fixture emits step delimiters often
    for card, cand in zip(win.cards, res.candidates):
        header = card.header.text()
        assert card.s.tokens == len(cand.token_ids) > 0
        assert card.s.steps == pytest.approx(cand.step_scores)
        assert card.bars.scores == card.s.steps
        assert f"{len(cand.token_ids)} tokens" in header and f"{len(cand.step_scores)} steps" in header
        assert f"score {cand.score:.3f}" in header and cand.finish_reason in header
        # The card holds exactly the trajectory's text; Qt may render control bytes of the
        # random fixture text differently (a lone \r becomes a line break), so check the held text.
        assert card.s.text.decode("utf-8", "replace") == cand.text

    chosen = [c for c in win.cards if c.chosen]
    assert [c.index for c in chosen] == [res.selected]
    assert "chosen" in chosen[0].header.text()
    assert all("chosen" not in c.header.text() for c in win.cards if not c.chosen)
    assert win.answer.toPlainText() == (res.answer or res.best.text)
    assert f"trajectory #{res.selected}" in win.answer_title.text()
    assert win.ask_button.isEnabled() and not win.cancel_button.isEnabled()

    # The highlight is drawn: the chosen card's border is green, the other's is not.
    qapp.processEvents()
    for card in win.cards:
        edge = card.grab().toImage().pixelColor(1, card.height() // 2)
        is_green = edge.green() > edge.red() + 40 and edge.green() > edge.blue() + 40
        assert is_green == card.chosen, (card.index, edge.name())

    shot = Path(os.environ.get("EDGE_MS_DESKTOP_SCREENSHOT", tmp_path / "desktop.png"))
    assert win.grab().save(str(shot))
    assert shot.stat().st_size > 10_000


def test_beam_search_shows_forks_and_stopped_trajectories(window, qapp):
    win = window
    forks_seen = []

    def done() -> bool:
        forks_seen.append(len(win.cards))
        return not win.busy

    assert win.ask("Compute 12 * 7 step by step.", mode="medium", max_new_tokens=80, seed=11, strategy="beam")
    wait_until(qapp, done)
    res = win.result
    assert win.error is None and res.strategy == "beam"
    assert len(win.cards) == len(res.candidates) > res.n == 8
    assert max(forks_seen) > 8  # fork cards appeared while the search ran
    for card, cand in zip(win.cards, res.candidates):
        header = card.header.text()
        assert card.index == cand.index and card.s.text.decode("utf-8", "replace") == cand.text
        if cand.parent is None:
            assert "fork of" not in header
        else:
            assert f"fork of #{cand.parent} after {cand.fork_at} tokens" in header
        assert card.stopped == (cand.finish_reason == "pruned") and cand.finish_reason in header
    stopped = [c for c in win.cards if c.stopped]
    assert stopped and not any(c.chosen for c in stopped)
    assert "dashed" in stopped[0].styleSheet()
    assert "forks" in win.statusBar().currentMessage()


def test_early_stop_picks_by_the_weighted_vote(window, qapp):
    win = window
    assert win.ask("Compute 12 * 7 step by step.", mode="medium", max_new_tokens=40, seed=3, strategy="early-stop")
    assert [c.s.state for c in win.cards] == ["waiting"] * 8
    wait_until(qapp, lambda: not win.busy)
    res = win.result
    assert win.error is None and res.strategy == "early-stop" and len(win.cards) == 8
    for card, cand in zip(win.cards, res.candidates):
        assert cand.finish_reason in card.header.text() and card.s.tokens == len(cand.token_ids)
    assert len(res.candidates) == 8  # the fixture states no answer: the vote never settles
    assert win.cards[res.selected].chosen


def test_cancel_stops_the_trajectories(window, qapp):
    win = window
    # 32 trajectories: the fixture ends a trajectory now and then, but not all 32 within 3000 tokens.
    assert win.ask("Count to a million.", mode="high", max_new_tokens=3000, seed=1)
    wait_until(qapp, lambda: any(c.s.tokens >= 5 for c in win.cards) or not win.busy)
    assert win.busy, "generation ended before it could be cancelled"
    win.cancel_button.click()
    wait_until(qapp, lambda: not win.busy, timeout=60)
    res = win.result
    assert win.error is None and res is not None
    assert "cancelled" in {c.finish_reason for c in res.candidates}
    assert all(len(c.token_ids) < 3000 for c in res.candidates)
    for card, cand in zip(win.cards, res.candidates):
        assert cand.finish_reason in card.header.text()
    # The window is usable again: a second question runs to the end.
    assert win.ask("Hi", max_new_tokens=8, seed=2)
    wait_until(qapp, lambda: not win.busy)
    assert {c.finish_reason for c in win.result.candidates} <= {"stop", "length"}


def test_a_model_that_cannot_load_is_one_message(app_module, qapp, tmp_path):
    win = app_module.MainWindow(model_spec={"model": str(tmp_path / "missing.gguf")})
    try:
        wait_until(qapp, lambda: win.ready or win.error)
        assert not win.ready and "missing.gguf" in win.error
        assert not win.ask_button.isEnabled() and not win.ask("Hi")
        assert win.error in win.answer.toPlainText()
    finally:
        close(qapp, win)


def test_card_shows_calibrated_confidence_beside_the_raw_score(app_module, qapp):
    from PySide6.QtGui import QFontDatabase

    card = app_module.TrajectoryCard(0, QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
    card.apply(app_module.Update("step", 0, step_score=1e-10, score=1e-5, confidence=0.156))
    card.refresh()
    header = card.header.text()
    # A head's raw score (1e-05) only ranks; the calibrated confidence is what a person reads.
    assert "confidence 0.16" in header and "score 1e-05" in header
    card.apply(app_module.Update("finish", 0, score=1e-5, finish_reason="stop"))  # an uncalibrated head
    card.refresh()
    assert "confidence" not in card.header.text() and "score 0.000" in card.header.text()
    card.deleteLater()
