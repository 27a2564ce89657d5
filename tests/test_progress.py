"""stylegan.progress: a tqdm bar on a terminal, whole lines in a log file."""

from __future__ import annotations

import io

import stylegan.progress as progress_mod
from stylegan.progress import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_with_the_count(monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 0.0)  # a line at every update
    log = io.StringIO()
    for _ in progress(range(5), desc="val", unit="img", stream=log):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("val:") and "0/5" in lines[0]
    assert "5/5" in lines[-1] and all(line.startswith("val:") for line in lines)


def test_a_terminal_gets_the_redrawn_bar():
    tty = _Tty()
    with progress(total=3, desc="bank", stream=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()


def test_postfix_updates_do_not_flood_a_log_file():
    """A loop that updates its postfix every step (train-encoder's loss) writes the opening
    and closing lines only when LOG_SECONDS has not passed."""
    log = io.StringIO()
    with progress(total=200, desc="train-encoder", stream=log) as bar:
        for step in range(200):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (step + 1):.4g}", refresh=False)
    lines = log.getvalue().splitlines()
    assert len(lines) <= 3 and "200/200" in lines[-1], lines
