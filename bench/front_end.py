"""How hard a server's HTTP front end worked during a load run: the CPU time of its process
(the API server; an engine core in a child process is not counted) and what it streamed.

A front end that needs close to one core per second of the run is the limit: streams then
coalesce (several tokens per SSE chunk) or arrive in bursts, whatever the engine does. That is
the question vLLM's ``--api-server-count`` answers, and the figure here says whether batchmax
needs it, for its server and vLLM's alike (both run the engine in a child process).

    cpu0 = process_cpu_s(pid); run = ...; fe = FrontEnd.of(run, process_cpu_s(pid) - cpu0)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads, children not included."""
    with open(f"/proc/{pid}/stat") as f:
        # the command name (field 2) may hold spaces: split after its closing parenthesis
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@dataclass
class FrontEnd:
    cpu_s: float
    """CPU seconds the front-end process used during the run."""
    wall_s: float
    chunks: int
    """SSE chunks that carried text, over every stream."""
    tokens: int
    """Completion tokens over every stream (from each stream's usage)."""

    @classmethod
    def of(cls, run, cpu_s: float) -> FrontEnd:
        """From a ``bench.load_client.LoadRun`` and the process's CPU seconds over it."""
        chunks = sum(r.num_chunks for r in run.results)
        tokens = sum(r.completion_tokens if r.completion_tokens is not None else r.num_chunks for r in run.results)
        return cls(cpu_s, run.duration, chunks, tokens)

    @property
    def core_share(self) -> float:
        """Cores the front end kept busy on average (1.0: one core all the time)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def us_per_chunk(self) -> float:
        return 1e6 * self.cpu_s / self.chunks if self.chunks else 0.0

    @property
    def tokens_per_chunk(self) -> float:
        return self.tokens / self.chunks if self.chunks else 0.0

    def line(self) -> str:
        return (f"{self.core_share:.0%} of one core ({self.cpu_s:.1f} s CPU in {self.wall_s:.1f} s), "
                f"{self.us_per_chunk:,.0f} us CPU per streamed chunk, {self.tokens_per_chunk:.2f} tokens per chunk")

    def as_dict(self) -> dict:
        return dict(asdict(self), core_share=self.core_share, us_per_chunk=self.us_per_chunk, tokens_per_chunk=self.tokens_per_chunk)
