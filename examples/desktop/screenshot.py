"""Take the README's screenshot of the desktop app: one question on the embedded default model.

    QT_QPA_PLATFORM=offscreen python examples/desktop/screenshot.py examples/desktop/screenshot.png

The window runs exactly as a user would drive it (type the question, pick the effort, Ask), then
its rendering is saved once the answer is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app import MainWindow  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

# The README's first question, with the CLI's defaults (8 trajectories, 1024 new tokens at most).
QUESTION = "Mia has 7 cards. Mia gives away 4 and then gets 2 more from a friend. How many cards does Mia have now?"


def _wait(qapp: QApplication, cond, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit("timed out waiting for the window")
        qapp.processEvents()
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args(argv)
    qapp = QApplication.instance() or QApplication(sys.argv[:1])
    win = MainWindow(model_spec={"model": None})
    win.resize(1280, 860)
    win.show()
    _wait(qapp, lambda: win.ready or win.error, 300)
    if win.error:
        raise SystemExit(win.error)
    win.prompt.setPlainText(args.question)
    win.effort.setCurrentIndex(win.effort.findData("medium"))
    win.max_tokens.setValue(1024)
    win.seed.setValue(args.seed)
    win.ask_button.click()
    _wait(qapp, lambda: not win.busy, 600)
    for _ in range(20):  # let the last repaints land
        qapp.processEvents()
        time.sleep(0.02)
    if not win.grab().save(args.out):
        raise SystemExit(f"{args.out}: could not write the screenshot")
    print(f"{args.out}: answer {win.result.answer!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
