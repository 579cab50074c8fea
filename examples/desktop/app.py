"""A desktop window on the edge_ms Python API: ask a question, watch the N trajectories grow
with their step scores, and get the one the SPRM head scored best.

A search strategy shows as it runs: beam search stops weak trajectories (their cards turn
grey, "pruned") and forks strong ones (a new card, "fork of #p after k tokens", that starts
with its parent's text); early stop greys out the live ones once the weighted vote is
settled. A card waits ("waiting") until its trajectory's first token: a search may start it later.

    python examples/desktop/app.py                  # the embedded default model
    python examples/desktop/app.py --model DIR      # a converted model: directory, store name, or GGUF + --head

Generation runs in a worker thread, one at a time (a Reasoner is not thread-safe). Engine
events cross to the window through Qt signals, which Qt queues into the UI thread. Cancel
sets the engine's abort flag, which stops a running ``llama_decode`` between graph nodes,
and the ``should_stop`` flag the engine polls between steps; the trajectories end as
``cancelled`` and the best of what was generated is still shown.

Needs PySide6 (``pip install "edge-ms[desktop]"``). Runs headless with QT_QPA_PLATFORM=offscreen.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, QRectF, Qt, QThread, QTimer, Signal, Slot
from PySide6.QtGui import QColor, QFont, QFontDatabase, QPainter, QPen
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from edge_ms.errors import EdgeMSError
from edge_ms.modes import MODES

FLUSH_S = 0.05  # the worker batches events: one signal per 50 ms, not one per token


# What the strategy box offers, in order (edge_ms.select.STRATEGIES has them all).
STRATEGY_CHOICES = ("best", "weighted", "beam", "early-stop", "prune", "majority")
STOPPED = ("pruned", "early-stop", "not started")


@dataclass
class Request:
    prompt: str
    mode: str
    max_new_tokens: int
    seed: int | None = None
    strategy: str = "best"


@dataclass
class Update:
    """One engine event, with the token's bytes decoded in the worker."""

    kind: str  # "token" | "step" | "fork" | "finish"
    index: int
    piece: bytes = b""
    n_tokens: int = 0
    step_score: float | None = None
    score: float = 0.0
    finish_reason: str | None = None
    confidence: float | None = None  # the running score calibrated, when the head has a calibration
    parent: int | None = None


class Worker(QObject):
    """Owns the Reasoner; lives in its own thread. Every slot runs there."""

    loaded = Signal(str)
    updates = Signal(list)
    finished = Signal(object)  # the Result
    failed = Signal(str)

    def __init__(self, reasoner=None) -> None:
        super().__init__()
        self.reasoner = reasoner
        self._cancel = threading.Event()

    @Slot(object)
    def load(self, spec: dict) -> None:
        from edge_ms.model import DeviceSettings
        from edge_ms.reasoner import Reasoner

        try:
            settings = DeviceSettings(n_threads=spec.get("threads"))
            self.reasoner = Reasoner.load(
                spec.get("model"), quant=spec.get("quant"), head=spec.get("head"), settings=settings
            )
        except EdgeMSError as err:
            self.failed.emit(str(err))
            return
        except Exception as err:  # the window must learn of any failure, or it waits forever
            self.failed.emit(f"{type(err).__name__}: {err}")
            return
        self.loaded.emit(self.reasoner.model.path.name)

    def arm(self) -> None:
        """Called by the window before it queues a run, so a Cancel pressed before the run starts counts."""
        self._cancel.clear()

    def cancel(self) -> None:
        """Callable from any thread."""
        self._cancel.set()
        if self.reasoner is not None:
            self.reasoner.engine.abort.set()

    @Slot(object)
    def run(self, req: Request) -> None:
        r = self.reasoner
        calibration = r.head.spec.calibration
        pending: list[Update] = []
        last = time.monotonic()
        try:
            for ev in r.stream(
                req.prompt,
                req.mode,
                max_new_tokens=req.max_new_tokens,
                seed=req.seed,
                strategy=req.strategy,
                should_stop=self._cancel.is_set,
            ):
                if ev.kind == "done":
                    self.updates.emit(pending)
                    self.finished.emit(ev.result)
                    return
                piece = (
                    r.model.piece(ev.token) if ev.kind == "token" and not r.model.is_eog(ev.token) else b""
                )
                conf = calibration(ev.score) if calibration is not None and ev.kind != "token" else None
                pending.append(
                    Update(ev.kind, ev.index, piece, ev.n_tokens, ev.step_score, ev.score, ev.finish_reason, conf,
                           ev.parent)
                )
                if time.monotonic() - last > FLUSH_S:
                    self.updates.emit(pending)
                    pending, last = [], time.monotonic()
        except EdgeMSError as err:
            self.failed.emit(str(err))
        except Exception as err:  # a window must not die on a bug: say it and stay usable
            self.failed.emit(f"{type(err).__name__}: {err}")


def score_color(score: float) -> QColor:
    """Red (0) through amber to green (1)."""
    return QColor.fromHsvF(max(0.0, min(1.0, score)) * 0.33, 0.8, 0.85)


class StepBars(QWidget):
    """One bar per scored step, its height and colour the step score; a dashed line marks 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.scores: list[float] = []
        self.setFixedHeight(56)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor("#f4f5f7"))
        labels = (w - 4) // max(1, len(self.scores)) >= 30  # room to print each score above its bar
        top, bottom = (15 if labels else 3), h - 3
        # Wide bars while there are few steps; once they no longer fit, the latest ones.
        pitch = max(6, min(34, (w - 4) // max(1, len(self.scores))))
        shown = self.scores[-max(1, (w - 4) // pitch) :]
        small = QFont(self.font())
        small.setPointSize(7)
        p.setFont(small)
        for i, s in enumerate(shown):
            bar = max(2.0, s * (bottom - top))
            rect = QRectF(2 + i * pitch, bottom - bar, pitch - 2, bar)
            p.fillRect(rect, score_color(s))
            if labels:
                p.setPen(QColor("#202124"))
                p.drawText(QRectF(rect.x(), 1, rect.width(), 13), Qt.AlignmentFlag.AlignCenter, f"{s:.2f}")
        p.setPen(QPen(QColor("#9aa0a6"), 1, Qt.PenStyle.DashLine))
        mid = (top + bottom) // 2
        p.drawLine(0, mid, w, mid)
        if not self.scores:
            p.setPen(QColor("#80868b"))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no scored step yet")
        p.end()


@dataclass
class CardState:
    tokens: int = 0
    steps: list[float] = field(default_factory=list)
    score: float = 0.0
    state: str = "waiting"  # until its first token: early stop starts its second wave later
    text: bytearray = field(default_factory=bytearray)
    confidence: float | None = None


class TrajectoryCard(QFrame):
    """One trajectory: a header with its counts and score, its step scores, its text.

    A fork's card starts as a copy of its parent's (``origin`` says whose, after how many tokens).
    """

    def __init__(self, index: int, mono: QFont, parent: TrajectoryCard | None = None, fork_at: int = 0) -> None:
        super().__init__()
        self.index = index
        self.s = CardState()
        self.origin = ""
        if parent is not None:
            p = parent.s
            self.s = CardState(fork_at, list(p.steps), p.score, "running", bytearray(p.text))
            self.origin = f"fork of #{parent.index} after {fork_at} tokens"
        self.chosen = False
        self.leading = False
        self.dirty = True
        self.setObjectName("card")
        self.header = QLabel()
        self.header.setTextFormat(Qt.TextFormat.RichText)
        self.bars = StepBars()
        self.body = QPlainTextEdit()
        self.body.setReadOnly(True)
        self.body.setFont(mono)
        self.body.setMinimumHeight(110)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 6, 8, 8)
        lay.addWidget(self.header)
        lay.addWidget(self.bars)
        lay.addWidget(self.body)
        self._style()
        self.refresh()

    def apply(self, u: Update) -> None:
        s = self.s
        if u.kind == "token":
            s.tokens = u.n_tokens
            s.text += u.piece
            if s.state == "waiting":
                s.state = "running"
        elif u.kind == "step":
            s.steps.append(u.step_score)
            s.score, s.confidence = u.score, u.confidence
        elif u.kind == "finish":
            s.score, s.confidence = u.score, u.confidence
            s.state = u.finish_reason or "done"
            self._style()
        self.dirty = True

    def finalize(self, cand) -> None:
        """Take the final values from the Result (the text without a stop string, the exact scores)."""
        self.s = CardState(
            len(cand.token_ids),
            list(cand.step_scores),
            cand.score,
            cand.finish_reason,
            bytearray(cand.text.encode()),
            cand.confidence,
        )
        self._style()
        self.dirty = True

    @property
    def stopped(self) -> bool:
        return self.s.state in STOPPED

    def set_flags(self, chosen: bool, leading: bool) -> None:
        if (chosen, leading) != (self.chosen, self.leading):
            self.chosen, self.leading = chosen, leading
            self._style()
            self.dirty = True

    def _style(self) -> None:
        if self.chosen:
            css = "QFrame#card { border: 3px solid #2e7d32; border-radius: 6px; background: #e8f5e9; }"
        elif self.leading:
            css = "QFrame#card { border: 2px solid #1a73e8; border-radius: 6px; background: #f1f6fe; }"
        elif self.stopped:
            css = "QFrame#card { border: 1px dashed #9aa0a6; border-radius: 6px; background: #eceff1; }"
        else:
            css = "QFrame#card { border: 1px solid #c4c7c5; border-radius: 6px; background: white; }"
        self.setStyleSheet(css)

    def header_text(self) -> str:
        s = self.s
        badge = ""
        if self.chosen:
            badge = "<span style='color:#1b5e20; font-weight:bold'>&#10004; chosen</span> &middot; "
        elif self.leading:
            badge = "<span style='color:#1a73e8'>&#9650; leading</span> &middot; "
        last = f"{s.steps[-1]:.3f}" if s.steps else "-"
        # A calibrated confidence reads as a probability; a raw score (often ~1e-8) only ranks.
        shown = s.score if s.confidence is None else s.confidence
        color = score_color(shown).darker(130).name() if s.steps else "#5f6368"
        value = (f"score {s.score:.3f}" if s.confidence is None
                 else f"confidence {s.confidence:.2f}</b> (score {s.score:.3g})<b>")
        origin = f"<span style='color:#6a1b9a'>{self.origin}</span> &middot; " if self.origin else ""
        return (
            f"{badge}{origin}<b>#{self.index}</b> &middot; {s.tokens} tokens &middot; {len(s.steps)} steps &middot; "
            f"last step {last} &middot; <b style='color:{color}'>{value}</b> &middot; "
            f"<i>{s.state}</i>"
        )

    def refresh(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        self.header.setText(self.header_text())
        self.bars.scores = self.s.steps
        self.bars.update()
        text = self.s.text.decode("utf-8", "replace")
        if text != self.body.toPlainText():
            self.body.setPlainText(text)
            bar = self.body.verticalScrollBar()
            bar.setValue(bar.maximum())


class MainWindow(QMainWindow):
    _start = Signal(object)
    _load = Signal(object)

    def __init__(self, reasoner=None, model_spec: dict | None = None) -> None:
        super().__init__()
        self.setWindowTitle("edge_ms - reflective reasoning on device")
        self.cards: list[TrajectoryCard] = []
        self.result = None
        self.error: str | None = None
        self.busy = False
        self.ready = reasoner is not None
        self._mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        self._mono.setPointSize(9)

        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Ask a question…")
        self.prompt.setFixedHeight(64)
        self.effort = QComboBox()
        for mode, n in MODES.items():
            self.effort.addItem(f"{mode} · {n} trajectories", mode)
        self.effort.setCurrentIndex(list(MODES).index("medium"))
        self.strategy = QComboBox()
        for name in STRATEGY_CHOICES:
            self.strategy.addItem(name, name)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(8, 32768)
        self.max_tokens.setValue(512)
        self.max_tokens.setPrefix("max ")
        self.max_tokens.setSuffix(" tokens")
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setSpecialValueText("random seed")  # shown at -1
        self.seed.setPrefix("seed ")
        self.seed.setValue(-1)
        self.ask_button = QPushButton("Ask")
        self.ask_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.ask_button.clicked.connect(lambda: self.ask())
        self.cancel_button.clicked.connect(self.cancel)

        controls = QHBoxLayout()
        controls.addWidget(QLabel("Effort"))
        controls.addWidget(self.effort)
        controls.addWidget(QLabel("Strategy"))
        controls.addWidget(self.strategy)
        controls.addWidget(self.max_tokens)
        controls.addWidget(self.seed)
        controls.addStretch(1)
        controls.addWidget(self.ask_button)
        controls.addWidget(self.cancel_button)

        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setSpacing(8)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.grid_host)

        self.answer_title = QLabel("<b>Answer</b>")
        self.answer = QPlainTextEdit()
        self.answer.setReadOnly(True)
        self.answer.setFixedHeight(90)

        root = QWidget()
        lay = QVBoxLayout(root)
        lay.addWidget(self.prompt)
        lay.addLayout(controls)
        lay.addWidget(scroll, 1)
        lay.addWidget(self.answer_title)
        lay.addWidget(self.answer)
        self.setCentralWidget(root)
        self.resize(1100, 760)

        self._thread = QThread(self)
        self.worker = Worker(reasoner)
        self.worker.moveToThread(self._thread)
        self._start.connect(self.worker.run)
        self._load.connect(self.worker.load)
        self.worker.loaded.connect(self._on_loaded)
        self.worker.updates.connect(self._on_updates)
        self.worker.finished.connect(self._on_finished)
        self.worker.failed.connect(self._on_failed)
        self._thread.start()
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._refresh)
        self._timer.start(50)
        self._set_busy(False)
        if reasoner is None:
            self.statusBar().showMessage("loading the model…")
            self.ask_button.setEnabled(False)
            self._load.emit(model_spec or {})
        else:
            self.statusBar().showMessage(f"model: {reasoner.model.path.name}")

    # -- actions ---------------------------------------------------------------

    def ask(
        self,
        prompt: str | None = None,
        mode: str | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        strategy: str | None = None,
    ) -> bool:
        """Start a generation (arguments default to the window's controls); False if one is running."""
        if self.busy or not self.ready:
            return False
        if prompt is not None:
            self.prompt.setPlainText(prompt)
        if mode is not None:
            self.effort.setCurrentIndex(list(MODES).index(mode))
        if max_new_tokens is not None:
            self.max_tokens.setValue(max_new_tokens)
        if seed is not None:
            self.seed.setValue(seed)
        if strategy is not None:
            self.strategy.setCurrentIndex(STRATEGY_CHOICES.index(strategy))
        text = self.prompt.toPlainText().strip()
        if not text:
            self.statusBar().showMessage("type a question first")
            return False
        mode = self.effort.currentData()
        self._reset_cards(MODES[mode])
        self.result, self.error = None, None
        self.answer.setPlainText("")
        self.answer_title.setText("<b>Answer</b> (generating…)")
        self._t0 = time.monotonic()
        self._set_busy(True)
        self.statusBar().showMessage(f"sampling {MODES[mode]} trajectories…")
        seed = self.seed.value()
        self.worker.arm()
        self._start.emit(Request(text, mode, self.max_tokens.value(), None if seed < 0 else seed,
                                 self.strategy.currentData()))
        return True

    def cancel(self) -> None:
        if self.busy:
            self.worker.cancel()
            self.statusBar().showMessage("cancelling…")

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.ask_button.setEnabled(not busy and self.ready)
        self.cancel_button.setEnabled(busy)
        self.effort.setEnabled(not busy)
        self.strategy.setEnabled(not busy)
        self.max_tokens.setEnabled(not busy)
        self.seed.setEnabled(not busy)

    def _reset_cards(self, n: int) -> None:
        for card in self.cards:
            self.grid.removeWidget(card)
            card.deleteLater()
        self._cols = 1 if n == 1 else 2 if n <= 8 else 4
        self.cards = []
        for i in range(n):
            self._add_card(TrajectoryCard(i, self._mono))

    def _add_card(self, card: TrajectoryCard) -> None:
        i = len(self.cards)
        self.cards.append(card)
        self.grid.addWidget(card, i // self._cols, i % self._cols)

    # -- from the worker -------------------------------------------------------

    @Slot(str)
    def _on_loaded(self, name: str) -> None:
        self.ready = True
        self._set_busy(False)
        self.statusBar().showMessage(f"model: {name}")

    @Slot(list)
    def _on_updates(self, updates: list) -> None:
        for u in updates:
            if u.kind == "fork" and u.index == len(self.cards) and 0 <= u.parent < len(self.cards):
                self._add_card(TrajectoryCard(u.index, self._mono, self.cards[u.parent], u.n_tokens))
            elif u.kind == "start" and u.index == len(self.cards):
                self._add_card(TrajectoryCard(u.index, self._mono))
            elif 0 <= u.index < len(self.cards):
                self.cards[u.index].apply(u)
        if self.cards:
            lead = max(self.cards, key=lambda c: (bool(c.s.steps) and not c.stopped, c.s.score))
            for c in self.cards:
                c.set_flags(False, c is lead and bool(c.s.steps) and not c.stopped)

    @Slot(object)
    def _on_finished(self, result) -> None:
        self.result = result
        self._set_busy(False)
        for cand in result.candidates:
            self.cards[cand.index].finalize(cand)
        for c in self.cards[len(result.candidates):]:  # early stop settled before they started
            c.s.state, c.dirty = "not started", True
            c._style()
        for c in self.cards:
            c.set_flags(c.index == result.selected, False)
        self._refresh()
        took = time.monotonic() - self._t0
        st = result.stats
        if result.selected < 0:
            for c in self.cards:
                c.s.state, c.dirty = "cancelled", True
            self._refresh()
            self.answer_title.setText("<b>Answer</b>: cancelled before the first token")
        else:
            best = result.best
            shown = (f"score {best.score:.3f}" if best.confidence is None
                     else f"confidence {best.confidence:.2f} (score {best.score:.3g})")
            answers = ", ".join(f"{a.answer} ({a.count}" + ("" if a.mass is None else f", mass {a.mass:.2f}") + ")"
                                for a in result.answers[:4])
            self.answer_title.setText(
                f"<b>Answer</b> from trajectory #{best.index}, {shown} "
                f"({len(best.step_scores)} steps, {best.finish_reason})" + (f" &middot; answers: {answers}" if answers else "")
            )
            self.answer.setPlainText(result.answer or best.text)
        rate = st.generated_tokens / st.total_s if st.total_s else 0.0
        forks = sum(c.parent is not None for c in result.candidates)
        stopped = sum(c.finish_reason in STOPPED for c in result.candidates)
        search = f"; {result.strategy}: {forks} forks, {stopped} stopped" if forks or stopped else ""
        self.statusBar().showMessage(
            f"{st.generated_tokens} tokens in {took:.1f} s ({rate:.0f} tokens/s over {result.n} trajectories){search}"
        )

    @Slot(str)
    def _on_failed(self, message: str) -> None:
        self.error = message
        self._set_busy(False)
        self.answer_title.setText("<b>Answer</b>: error")
        self.answer.setPlainText(message)
        self.statusBar().showMessage(f"error: {message}")

    def _refresh(self) -> None:
        for c in self.cards:
            c.refresh()

    def closeEvent(self, event) -> None:
        self.worker.cancel()
        self._thread.quit()
        self._thread.wait()
        if self.worker.reasoner is not None:
            self.worker.reasoner.close()
            self.worker.reasoner = None
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="edge_ms desktop: N reasoning trajectories, scored step by step."
    )
    ap.add_argument(
        "--model", "-m", default=None, help="Model directory, store name or GGUF (default: embedded)."
    )
    ap.add_argument("--head", default=None, help="SPRM head (.sprm.onnx) when --model is a bare GGUF.")
    ap.add_argument("--quant", default=None, help="Which GGUF of the model to use.")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores).")
    args = ap.parse_args(argv)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    win = MainWindow(model_spec=vars(args))
    # Deleted when closed, while the QApplication still exists (not at interpreter exit).
    win.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    win.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
