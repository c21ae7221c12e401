"""Progress in logs (issue 22): a plain line every N seconds or percent where the output is no
terminal, a tqdm bar where it is."""

from __future__ import annotations

import io

from service.progress import LogProgress, progress_bar


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_log_gets_a_line_every_ten_percent_or_thirty_seconds_not_every_step():
    out, clock = io.StringIO(), _Clock()
    bar = LogProgress(2000, desc="train isotropic", unit="step", file=out, every_s=30, clock=clock)
    for _ in range(2000):
        clock.t += 0.01  # 20 s for the whole run: only the percent rule prints
        bar.set_postfix(loss="0.0213")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines  # 10 %, 20 %, … 100 %: not 2000 redraws
    assert lines[0].startswith("train isotropic: 200/2000 step (10%), 2s, 100 step/s, ETA 18s; loss=0.0213")
    assert lines[-1].startswith("train isotropic: 2000/2000 step (100%)") and "ETA" not in lines[-1]
    out, clock = io.StringIO(), _Clock()
    bar = LogProgress(None, desc="restore", unit="img", file=out, every_s=30, clock=clock)
    for _ in range(100):  # no total: a line every 30 s, and one at the end
        clock.t += 1.0
        bar.update(1)
    bar.close()
    assert [ln.split(",")[0] for ln in out.getvalue().splitlines()] == [
        "restore: 30 img", "restore: 60 img", "restore: 90 img", "restore: 100 img"]


def test_a_terminal_gets_tqdm_and_quiet_gets_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm
    bar = progress_bar(10, desc="x", file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(10, file=io.StringIO()), LogProgress)
    off = progress_bar(10, disable=True)
    off.update(3)
    assert off.n == 3
