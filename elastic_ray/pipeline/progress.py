"""What the driver shows while the pipeline runs: one progress line on a terminal (rows captioned
so far, of the rows to do, and the rate), and the quality sample's verdict as soon as it is
measured; both from what the caption actors report."""

import sys
import threading
import time

import ray

INTERVAL_S = 1.0


class Progress:
    """While the `with` block runs, every INTERVAL_S: rewrite one line on stderr when stderr is a
    terminal and `show` is set (the line is cleared at the end), and hand the quality sample's
    result to `on_quality` once, when an actor has reported it."""

    def __init__(self, stats, total: int, show: bool, on_quality=None, stream=None):
        self.stats, self.total, self.on_quality, self.stream = stats, total, on_quality, stream or sys.stderr
        self.show = show and self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> "Progress":
        self.start = time.perf_counter()
        if self.show or self.on_quality:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        if self.show:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def line(self, rows: int, seconds: float) -> str:
        rate = f"{rows / seconds:.1f} rows/s" if rows and seconds > 0 else "starting"
        return f"captioning: {rows}/{self.total} rows, {rate}"

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            if self.on_quality and (quality := ray.get(self.stats.sample.remote())) is not None:
                if self.show:
                    self.stream.write("\r\033[K")
                self.on_quality(quality)
                self.on_quality = None
            if self.show:
                actors = ray.get(self.stats.snapshot.remote())
                rows = sum(a["rows"] for a in actors.values())
                self.stream.write("\r\033[K" + self.line(rows, time.perf_counter() - self.start))
                self.stream.flush()
            elif not self.on_quality:
                return
