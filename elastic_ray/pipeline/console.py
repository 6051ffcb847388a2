"""What a run prints: Ray's own console lines that do not concern the person running the job are
left out (they stay in Ray's log files).

- Ray Data's INFO lines (execution plans, progress notes): its console handler shows warnings and
  errors only; `Progress` prints the one progress line.
- The notice that token authentication is on: the job keeps Ray's token authentication on by design.
- core_worker.cc's error line "Actor with class name: 'MapWorker(...)' ... has constructor
  arguments in the object store and max_restarts > 0" (ray-project/ray#53727). Its cause is Ray
  Data's, not the job's: every actor pool's MapWorker gets its DataContext and map transformer as
  object-store references (`ray.put`), and Ray Data gives its actors `max_restarts=-1` so that a
  dead caption actor is restarted. The driver owns those references for the whole run, so a
  restart finds them; only losing the driver's node would lose them, and that ends the run
  anyway. The driver's core worker writes the line to stderr from C++, so `DroppedLines` filters
  file descriptor 2 itself.
"""

import logging
import os
import re
import sys
import threading

MAP_WORKER_RESTART_NOTE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the object store")


def quiet_ray() -> None:
    """Ray Data's console shows warnings and errors only, without the note that its progress bars
    are off; Ray's notice that token authentication is on is not shown."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_progress_note)


def _not_progress_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


class DroppedLines:
    """While the `with` block runs, lines written to this process's stderr (file descriptor 2, so
    C++ writes too) that match `pattern` are dropped; the rest pass through a pipe unchanged.
    Processes started meanwhile inherit the pipe; their lines pass through it as well."""

    def __init__(self, pattern: re.Pattern = MAP_WORKER_RESTART_NOTE):
        self.pattern = pattern

    def __enter__(self) -> "DroppedLines":
        sys.stderr.flush()
        self.stderr = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, args=(read,), name="stderr-filter", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self.stderr, 2)  # closes this process's write end of the pipe
        self.thread.join(timeout=5)  # ends once every process holding the pipe has exited
        os.close(self.stderr)

    def _pump(self, read: int) -> None:
        with os.fdopen(read, "rb") as lines, os.fdopen(os.dup(self.stderr), "wb", buffering=0) as out:
            for line in lines:
                if not self.pattern.search(line):
                    out.write(line)
