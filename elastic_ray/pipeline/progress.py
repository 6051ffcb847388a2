"""The one progress line a run shows on a terminal: rows captioned so far, of the rows to do, and
the rate, from what the caption actors report."""

import sys
import threading
import time

import ray

INTERVAL_S = 1.0


class Progress:
    """While the `with` block runs, rewrite one line on stderr every INTERVAL_S, when stderr is a
    terminal and `show` is set; otherwise do nothing. The line is cleared at the end."""

    def __init__(self, stats, total: int, show: bool, stream=None):
        self.stats, self.total, self.stream = stats, total, stream or sys.stderr
        self.show = show and self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> "Progress":
        if self.show:
            self.start = time.perf_counter()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.show:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r\033[K")
            self.stream.flush()

    def line(self, rows: int, seconds: float) -> str:
        rate = f"{rows / seconds:.1f} rows/s" if rows and seconds > 0 else "starting"
        return f"captioning: {rows}/{self.total} rows, {rate}"

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            actors = ray.get(self.stats.snapshot.remote())
            rows = sum(a["rows"] for a in actors.values())
            self.stream.write("\r\033[K" + self.line(rows, time.perf_counter() - self.start))
            self.stream.flush()
