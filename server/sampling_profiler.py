"""A low-overhead sampling profiler for the server's own process (``batchmax serve
--debug-profile FILE``, for performance work only): a thread looks at the main thread's stack
every few milliseconds and counts where it is; at exit the counts go to FILE, the functions
most often on top of the stack ("self") and anywhere on it ("total"). No tracing hook, so
the process runs at its normal speed (a sample costs a few microseconds)."""
from __future__ import annotations

import collections
import sys
import threading


class SamplingProfiler:
    def __init__(self, path: str, interval_s: float = 0.002) -> None:
        self.path = path
        self.interval = interval_s
        self.target = threading.main_thread().ident
        self.self_counts: collections.Counter = collections.Counter()
        self.total_counts: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchmax-profiler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.target)  # noqa: SLF001 - the documented way to sample a thread
            if frame is None:
                continue
            self.samples += 1
            names = []
            while frame is not None:
                code = frame.f_code
                names.append(f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}")
                frame = frame.f_back
            self.self_counts[names[0]] += 1
            for n in set(names):
                self.total_counts[n] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)
        with open(self.path, "w") as f:
            f.write(f"{self.samples} samples every {self.interval * 1e3:.0f} ms of the main thread (waiting shows as the event loop's own frame: selectors.py:select, or runners.py:run under uvloop)\n\n")
            for title, counts in (("self", self.self_counts), ("total", self.total_counts)):
                f.write(f"--- {title}\n")
                for name, c in counts.most_common(45):
                    f.write(f"{100 * c / max(1, self.samples):6.1f}%  {name}\n")
                f.write("\n")
