"""``EngineLoop`` against a scripted transport: how commands taken together are answered."""
from __future__ import annotations

from batchmax.engine import LLM, SamplingParams
from batchmax.engine.engine_loop import STOP, AbortCommand, AddCommand, EngineLoop


class Script:
    """Hands the loop one batch of commands per ``take`` and records what it answers."""

    def __init__(self, batches: list[list]) -> None:
        self.batches = batches
        self.events: list[tuple] = []

    def take(self, block, timeout):
        return self.batches.pop(0) if self.batches else [STOP]

    def accepted(self, cmd, error, state):
        self.events.append(("accepted", cmd.tag, error, state.stats.num_running + state.stats.num_waiting))

    def deliver(self, outputs, t, state):
        self.events.extend(("output", e.tag, o.finish_reason) for e, o in outputs)


def test_a_burst_of_adds_is_answered_after_one_stats_refresh(tiny_llama):
    engine = LLM(str(tiny_llama), device="cpu", num_tokens=4096).engine
    calls = []
    stats = engine.stats
    engine.stats = lambda: calls.append(1) or stats()  # counts the refreshes  # noqa: E731
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    adds = [AddCommand([(f"r{i}", [5 + i, 6, 7], params)], tag=i) for i in range(20)]
    script = Script([adds])
    loop = EngineLoop(engine, script)
    calls.clear()
    loop.iteration()
    # one refresh for the 20 adds, one after the step: not one per add
    assert len(calls) == 2
    accepted = [e for e in script.events if e[0] == "accepted"]
    assert [e[1] for e in accepted] == list(range(20))
    assert all(e[2] is None and e[3] == 20 for e in accepted)  # every answer sees all 20 added


def test_adds_are_answered_before_a_later_command_ends_them(tiny_llama):
    engine = LLM(str(tiny_llama), device="cpu", num_tokens=4096).engine
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    bad = SamplingParams(max_tokens=2, stop_token_ids=[10**9])  # an id past the vocabulary: refused
    script = Script([[AddCommand([("a", [5, 6], params)], tag="a"), AddCommand([("b", [5, 6], bad)], tag="b"),
                      AbortCommand(["a"]), AddCommand([("c", [7, 8], params)], tag="c"), STOP]])
    loop = EngineLoop(engine, script)
    assert loop.iteration() is False
    ev = script.events
    assert ev[0][:2] == ("accepted", "a") and ev[0][2] is None
    assert ev[1][:2] == ("accepted", "b") and isinstance(ev[1][2], ValueError)
    assert ev[2] == ("output", "a", "abort")  # after its answer, never before
    assert ev[3][:2] == ("accepted", "c") and ev[4] == ("output", "c", "abort")  # STOP ends c after its answer
    assert not loop.entries
