"""The front end's half of a request's outputs: per-step deltas from the engine core become
``RequestOutput``s, with the text decoded and stop strings checked here, off the device loop
(vLLM's ``OutputProcessor`` does the same).

A stop string ends the request here at once (finish_reason ``stop``, the text cut before it);
the caller then aborts it in the core, which may already have run a step or two more, whose
tokens are dropped.
"""
from __future__ import annotations

import time

from batchmax.engine.core_messages import Delta, WireLogprob
from batchmax.engine.detokenizer import Detokenizer
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.request import TokenLogprob
from batchmax.engine.sampling import SamplingParams


def _logprob(w: WireLogprob | None) -> TokenLogprob | None:
    if w is None:
        return None
    tid, lp, top, rank = w
    return TokenLogprob(tid, lp, [(int(a), float(b)) for a, b in top], rank)


class RequestState:
    """Everything the front end has received for one request."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.detok = Detokenizer.for_params(tokenizer, prompt_ids, params) if tokenizer is not None else None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.finished = False
        self.last: RequestOutput | None = None

    def apply(self, d: Delta) -> tuple[RequestOutput, bool]:
        """The output after this delta, and whether a stop string ended the request here
        (then the core still runs it: the caller aborts it there)."""
        stop_str = None
        p = self.params
        self.prompt_logprobs.extend(_logprob(w) for w in d.new_prompt_logprobs)
        # The core ends a request with "stop" only on a stop token (EOS or stop_token_ids;
        # stop strings are found here), always its last one: that token's text is not shown
        # unless include_stop_str_in_output.
        hidden = len(d.new_token_ids) - 1 if d.finished and d.finish_reason == "stop" and not p.include_stop_str_in_output else -1
        for i, tok in enumerate(d.new_token_ids):
            self.token_ids.append(tok)
            if i < len(d.new_logprobs):
                self.logprobs.append(_logprob(d.new_logprobs[i]))
            if self.detok is not None and i != hidden:
                stop_str = self.detok.add(tok, check_stop=len(self.token_ids) >= p.min_tokens)
                if stop_str is not None:
                    break  # tokens after the stop string are not the request's
        stopped_here = stop_str is not None
        finished = d.finished or stopped_here
        if self.detok is not None and finished and not stopped_here:
            self.detok.flush()
        self.finished = finished
        out = RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            # copies: an output handed to a reader must not grow under it
            token_ids=list(self.token_ids),
            text=self.detok.safe_text(finished) if self.detok is not None else "",
            finished=finished,
            finish_reason="stop" if stopped_here else d.finish_reason,
            stop_reason=stop_str if stopped_here else d.stop_reason,
            error=None if stopped_here else d.error,
            logprobs=list(self.logprobs),
            prompt_logprobs=list(self.prompt_logprobs),
            arrival_time=d.arrival_time,
            first_scheduled_time=d.first_scheduled_time,
            first_token_time=d.first_token_time,
            finished_time=d.finished_time,
            num_preemptions=d.num_preemptions,
        )
        if stopped_here and out.finished_time is None:
            out.finished_time = time.monotonic()
        self.last = out
        return out, stopped_here
