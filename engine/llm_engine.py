"""The synchronous engine: add requests, ``step()``, read outputs. One thread drives it
(``LLM`` offline, ``AsyncEngine``'s loop thread online); nothing here knows about HTTP."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path

import torch

from batchmax.engine.config import EngineConfig, default_batched_tokens
from batchmax.engine.default_model import DEFAULT_MODEL_NAME, resolve_model
from batchmax.engine.detokenizer import Detokenizer
from batchmax.engine.faults import StepError
from batchmax.engine.inflight import LogprobTensors, StepInFlight, to_host
from batchmax.engine.logits_processors import (
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    LogitsProcessors,
    LogitsSpec,
    bad_words_token_ids,
)
from batchmax.engine.model_runner import ModelRunner
from batchmax.engine.outputs import RequestOutput
from batchmax.engine.parallel import TPError, TPGroup, rank_device
from batchmax.engine.request import FinishReason, Request, TokenLogprob
from batchmax.engine.sampling import Sampler, SamplingParams
from batchmax.engine.scheduler import Scheduler
from batchmax.engine.stats import EngineStats
from batchmax.engine.structured_output import StructuredOutputs
from batchmax.policies import get_policy

log = logging.getLogger("batchmax")


class LLMEngine:
    def __init__(self, config: EngineConfig, *, tp_rank: int = 0, tp_init: str | None = None, model_path: str | None = None) -> None:
        """``tp_rank``, ``tp_init``, ``model_path``: set only by a tensor-parallel worker
        (``engine/tp_worker.py``); with ``tensor_parallel_size > 1`` the caller's engine is
        rank 0 and spawns the others."""
        from transformers import AutoTokenizer

        self.config = config
        path = model_path or resolve_model(config.model)
        self.model_path = path
        self.model_name = DEFAULT_MODEL_NAME if config.model is None else Path(path).resolve().name
        self.tokenizer = None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(config.tokenizer or path)
        self.tp_driver = None  # rank 0 of a tensor-parallel group: the workers (tp_worker.py)
        self.tp_diverged = False  # a worker that could not apply one of rank 0's commands
        tp = None
        if config.tensor_parallel_size > 1:
            from batchmax.engine.model_runner import resolve_device
            from batchmax.engine.tp_worker import TPDriver

            if tp_rank == 0:
                self.tp_driver = TPDriver(config, str(path))
                tp_init = self.tp_driver.init_method
            try:
                device = rank_device(resolve_device(config.device), tp_rank)
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                tp = TPGroup(tp_rank, config.tensor_parallel_size, tp_init, device, config.tp_timeout_s)
            except BaseException:
                self.shutdown()
                raise
        try:
            self.runner = ModelRunner(config, path, load_weights=config.load_format == "auto", tp=tp)
            self._init_rest(config)
        except BaseException:
            self.shutdown()
            raise

    def _init_rest(self, config: EngineConfig) -> None:
        spec = self.runner.spec
        self.max_model_len = config.scheduler.max_model_len or spec.max_position_embeddings
        sliding = getattr(self.runner.hf_config, "sliding_window", None)
        if sliding and getattr(self.runner.hf_config, "use_sliding_window", True) is not False:
            # batchmax attends to the whole (possibly evicted) cache; stay where that is exact
            self.max_model_len = min(self.max_model_len, sliding)
        sc = config.scheduler
        if sc.max_num_batched_tokens is None:  # the device's default, now that the device is known
            sc = dataclasses.replace(sc, max_num_batched_tokens=default_batched_tokens(self.runner.device.type))
        self.scheduler_config = sc
        useful = sc.max_num_seqs * self.max_model_len + sc.chunk_size
        # the sampler's per-request tables grow with use: size the pool as if max_num_seqs used them
        tables = LogitsProcessors.table_bytes(sc.max_num_seqs, spec.vocab_size)
        self.cache = self.runner.allocate_cache(self.runner.pool_tokens(useful, reserve_bytes=tables))
        # a request's blocks cover at most max_model_len tokens plus one chunk being evicted
        self.runner.prepare_cuda_graphs(self.cache, self.cache.blocks_for(self.max_model_len + sc.chunk_size))
        self.scheduler = Scheduler(sc, self.cache, config.eviction.evict_decode_every)
        if config.eviction.kv_recall or config.cache.host_kv_tokens:
            self._ensure_host_store()  # up front: pinning gigabytes mid-serving would stall
        self.sampler = Sampler(self.cache.stager.to_device)
        self.processors = LogitsProcessors(spec.vocab_size, self.runner.device, self.cache.stager.to_device)
        asc = sc.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if asc is None else asc
        self._inflight: StepInFlight | None = None  # launched, tokens not read yet (async scheduling)
        self._touched_unreported: list[Request] = []  # got tokens in a step processed as the next one failed
        self._rank = 0 if self.runner.tp is None else self.runner.tp.rank
        self.eos_token_ids = self._eos_ids()
        # grammar-constrained decoding; nothing is compiled or allocated before a request uses it
        self.structured = StructuredOutputs(
            config.structured_outputs, self.tokenizer, spec.vocab_size, self.eos_token_ids, self.cache.stager.to_device,
        )
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, Detokenizer] = {}
        self.windows: dict = {}  # observation windows of evicting requests, across steps
        self._finished_unreported: list[Request] = []
        self._seed_counter = itertools.count()
        self._stats = EngineStats(kv_capacity_tokens=self.cache.capacity_tokens)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.runner.hf_config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            ids.update([gen] if isinstance(gen, int) else (gen or []))
        except (OSError, ValueError):
            pass
        return ids

    # ---- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine runs without a tokenizer: give token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with a message fit for a client, if the request cannot run."""
        self._validated("probe", prompt_ids, params)

    def _validated(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        """The request with its policy resolved, or ValueError if it cannot run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        # Every token id a request carries, checked here: one out of range would otherwise
        # fail inside the step (the sampler's scatter, the embedding), and with it every
        # request of that step. The messages name the parameter (the server's engine_error
        # maps them to ``param``).
        vocab = self.runner.spec.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        bad = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"stop_token_ids: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if params.structured_outputs is not None and params.min_tokens:
            raise ValueError("min_tokens cannot be combined with structured_outputs (the grammar decides where the output ends)")
        spec = self._logits_spec(params) if params.processes_logits else None
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens and asks for {params.max_tokens} completion tokens "
                f"({len(prompt_ids) + params.max_tokens} in total)"
            )
        req = Request(request_id, list(prompt_ids), params, logits_spec=spec)
        self._resolve_policy(req)
        if not self.scheduler.fits_pool(req):
            need = self.scheduler.footprint_tokens(req)
            raise ValueError(f"the request needs {need} tokens of KV cache, more than the pool holds ({self.cache.capacity_tokens})")
        if params.structured_outputs is not None:
            # last: parsed here (a ValueError when invalid), compiled in the background (structured_output.py)
            req.grammar = self.structured.new_state(params.structured_outputs)
        return req

    def _logits_spec(self, params: SamplingParams) -> LogitsSpec:
        """The request's logits processing, every token id checked against the vocabulary
        (the messages name the parameter)."""
        vocab = self.runner.spec.vocab_size
        for name, ids in (("logit_bias", list(params.logit_bias or ())), ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        words: list[list[int]] = []
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words needs a tokenizer; this engine runs without one")
            words = bad_words_token_ids(self.tokenizer, params.bad_words)
            if len(words) > MAX_BAD_WORDS or sum(map(len, words)) > MAX_BAD_WORD_TOKENS:
                raise ValueError(
                    f"bad_words: {len(params.bad_words)} words make {len(words)} token sequences of "
                    f"{sum(map(len, words))} tokens; at most {MAX_BAD_WORDS} sequences of {MAX_BAD_WORD_TOKENS} tokens in all"
                )
            bad = [t for w in words for t in w if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"bad_words: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return LogitsSpec(
            logit_bias=dict(params.logit_bias or {}),
            allowed_token_ids=params.allowed_token_ids,
            bad_words=words,
            repetition_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
        )

    def _resolve_policy(self, req: Request) -> None:
        """The request's policy and per-layer budgets (its own, else the engine's default)."""
        ev = self.config.eviction
        name = req.params.kv_policy or ev.kv_policy
        args = ev.kv_policy_args if name.strip().lower() == ev.kv_policy.strip().lower() else {}
        policy = get_policy(name, **args)  # ValueError naming the known policies
        if not policy.evicts:
            req.policy, req.layer_budgets = None, None
            return
        budget = req.params.kv_budget if req.params.kv_budget is not None else ev.kv_budget
        if budget is None:
            raise ValueError(f"kv_policy {policy.name!r} evicts and needs a kv_budget (tokens kept per layer and KV head)")
        policy.validate_budget(budget)
        req.policy = policy
        req.layer_budgets = policy.layer_budgets(budget, self.runner.spec.num_layers)
        recall = req.params.kv_recall
        req.recall = ev.kv_recall if recall is None else recall

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        prompt_ids = self.tokenize(prompt)
        req = self._validated(request_id, prompt_ids, params)
        if not params.greedy:
            seed = params.seed if params.seed is not None else hash((self.config.seed, next(self._seed_counter))) & (2**63 - 1)
            req.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        if req.recall:
            self._ensure_host_store()
        if req.grammar is not None:
            self.structured.track(req)
        self.requests[request_id] = req
        if self.tokenizer is not None and self.config.detokenize:
            self.detok[request_id] = Detokenizer.for_params(self.tokenizer, prompt_ids, params)
        self.scheduler.add(req)
        if self.tp_driver is not None:  # added here: the workers apply the same add before the next step
            self.tp_driver.record("add", request_id, prompt_ids, params)

    def _ensure_host_store(self) -> None:
        if self.scheduler.host is None:
            self.scheduler.host = self.runner.allocate_host_store(self.cache.capacity_tokens)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return
        if self.tp_driver is not None:
            self.tp_driver.record("abort", request_id)
        self.scheduler.remove(req)  # frees its KV now
        self._finish(req, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_unfinished() or bool(self._finished_unreported)
            or self._inflight is not None or bool(self._touched_unreported)
        )

    def _finish(self, req: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        req.finish(reason, stop_reason)
        if req in self.scheduler.running or req in self.scheduler.waiting:
            self.scheduler.remove(req)
        self._finished_unreported.append(req)

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then report the step whose tokens are now known:
        this one, or with async scheduling the one launched before it (whose device work ran
        while this one was being scheduled and launched)."""
        t0 = time.perf_counter()
        try:
            if self.runner.tp is not None:
                return self._tp_step()
            return self._step()
        finally:
            self._stats.step_seconds_total += time.perf_counter() - t0

    def _tp_step(self) -> list[RequestOutput]:
        """One step on every rank: rank 0 sends the workers its commands since the last step,
        every rank steps, then all compare how the step ended. Each rank applied the same
        commands in the same order, so the same step fails (``StepError``: the same requests)
        or succeeds everywhere; if the ranks disagree their states differ and the group is
        unusable: ``TPError``, fatal (as is a collective that fails: a dead rank)."""
        if self.tp_driver is not None:
            self.tp_driver.send_step()
        code, err, outs = 0, None, []
        try:
            if self.tp_diverged:  # let the status exchange tell every rank
                code = 3
            else:
                outs = self._step()
        except TPError as exc:
            self._tp_broken(exc)
        except StepError as exc:
            code, err = 1, exc
        except Exception as exc:  # noqa: BLE001 - compared across ranks first
            code, err = 2, exc
        digest = self._state_digest() if self.config.faults.debug_tp_check_state else 0
        try:
            got = self.runner.tp.agree(code, digest)
        except TPError as exc:
            self._tp_broken(exc)
        codes = [c for c, _ in got]
        if len(set(codes)) > 1:
            raise TPError(f"tensor-parallel ranks disagree about a step (status per rank {codes}; 0 ok, 1 step error, 2 other error, 3 diverged)")
        if len({d for _, d in got}) > 1:
            raise TPError("tensor-parallel ranks hold different scheduler or pool state after a step")
        if err is not None:
            raise err
        return outs

    def _tp_broken(self, exc: TPError) -> None:
        """Re-raise a failed collective, naming the dead rank when there is one (rank 0)."""
        if self.tp_driver is not None:
            try:
                self.tp_driver.check_alive(wait=2.0)
            except TPError as dead:
                raise dead from exc
        raise exc

    def _state_digest(self) -> int:
        """A hash of what every rank must agree on (``FaultConfig.debug_tp_check_state``)."""
        import hashlib

        sch = self.scheduler
        parts = [
            [r.request_id for r in sch.running], [r.request_id for r in sch.waiting],
            sorted((rid, s.blocks, s.lens, s.seen) for rid, s in self.cache.seqs.items()),
            sorted((rid, r.output_token_ids, r.num_computed_tokens) for rid, r in self.requests.items()),
        ]
        return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=7).digest(), "little")

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the process group (no-op otherwise)."""
        runner = getattr(self, "runner", None)
        if runner is not None and runner.tp is not None:
            runner.tp.close()
        if self.tp_driver is not None:
            self.tp_driver.shutdown()
            self.tp_driver = None

    def _step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        launched: StepInFlight | None = None
        failed: list[str] = []
        cause: BaseException | None = None
        if sched.requests:
            # A failure here breaks the requests of this step only: name them (faults.py).
            try:
                self.config.faults.check_step(sched.requests, self._rank)  # testing only; no-op unless configured
                launched = self._launch(sched.requests, sched.num_new_tokens)
            except TPError:  # the tensor-parallel group is broken: not this step's requests' fault
                raise
            except Exception as exc:
                failed, cause = [r.request_id for r in sched.requests], exc
        if self.async_scheduling:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        touched, self._touched_unreported = self._touched_unreported, []
        if done is not None:
            try:
                touched += self._process(done)
            except TPError:
                raise
            except Exception as exc:  # its tokens never arrived: its requests are broken
                failed += [r.request_id for r in done.requests if r.request_id not in failed]
                cause = cause or exc
        if cause is not None:
            # what the finished step gave is reported by the next step
            self._touched_unreported = touched
            raise StepError(failed, cause) from cause
        st = self._stats
        st.num_steps_total += bool(sched.requests)
        st.running_batch_size = len(sched.requests)
        st.peak_running_batch_size = max(st.peak_running_batch_size, len(self.scheduler.running))
        st.last_step_tokens = sched.num_tokens
        st.scheduled_tokens_total += sched.num_tokens
        outs: dict[str, RequestOutput] = {}
        for r in touched + self._finished_unreported:
            if r.request_id not in outs:
                outs[r.request_id] = self._output(r)
        for r in self._finished_unreported:
            self.processors.release(r)
            self.structured.release(r)
            self.requests.pop(r.request_id, None)
            self.detok.pop(r.request_id, None)
            self.windows.pop(r.request_id, None)
        self._finished_unreported = []
        return list(outs.values())

    @torch.inference_mode()
    def _launch(self, reqs: list[Request], num_new: list[int]) -> StepInFlight:
        """Queue the step's forward, sampling and copies to the host; read nothing back."""
        now = time.monotonic()
        rows: list[int] = []  # packed-token index of each logit row: sampled rows, then prompt rows
        prompt_at: list[int] = []
        step = StepInFlight(requests=list(reqs))
        offset = 0
        for req, n in zip(reqs, num_new):
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            if req.num_computed_tokens == 0 and req.num_preemptions == 0:
                self._stats.prompt_tokens_total += req.num_prompt_tokens
            if req.params.prompt_logprobs is not None:
                # logits at token i predict prompt token i + 1; a recomputed prompt (after a
                # preemption) asks only for the rows it has not reported yet
                have = max(1, len(req.prompt_logprobs))
                for j in range(n):
                    p = req.num_computed_tokens + j + 1
                    if have <= p < req.num_prompt_tokens:
                        prompt_at.append(offset + j)
                        step.prompt_rows.append((req, p))
            if req.num_computed_tokens + n == req.num_tokens:
                rows.append(offset + n - 1)
                step.sampled.append(req)
            offset += n
        logits, evicted = self.runner.execute(
            self.cache, reqs, num_new, rows + prompt_at, self.windows, self.scheduler.host, self._inflight
        )
        self._stats.kv_tokens_evicted_total += evicted
        for req, n in zip(reqs, num_new):
            req.num_computed_tokens += n
            self._stats.kv_tokens_seen_total += n * self.runner.spec.num_layers

        sampled = step.sampled
        if sampled:
            lg = logits[: len(sampled)]  # (S, V)
            if self.structured.num_active:
                # grammar bitmasks first, in place on the constrained rows (vLLM's order); with
                # async scheduling this waits for the previous step's tokens, after this
                # step's forward is queued (structured_output.py, "Async scheduling")
                self.structured.apply(lg, sampled, self._inflight)
            # bias, allowed ids, bad words, penalties: a float32 copy when any request has
            # them, else the logits as they are (nothing runs)
            lg, processed = self.processors.apply(lg, sampled)
            suppress = [self._suppressed(r) for r in sampled]  # before this step's token is pending
            tokens = self.sampler(lg, [r.params for r in sampled], [r.generator for r in sampled], suppress)  # edits lg in place
            if self.runner.tp is not None:
                # every rank sampled the same logits with the same generators; rank 0's ids
                # are taken anyway, so the ranks' histories cannot drift apart
                tokens = self.runner.tp.broadcast(tokens.contiguous(), 0)
            self.processors.update(processed, tokens)  # counts and tails hold this step's tokens, on the device
            step.tokens, step.host_tokens = tokens, to_host(tokens)
            step.row_of = {r.request_id: i for i, r in enumerate(sampled)}
            want = [r.params.logprobs for r in sampled if r.params.logprobs is not None]
            if want:
                step.logprobs = tuple(to_host(t) for t in Sampler.logprobs(lg, tokens, max(want)))
            for r in sampled:
                r.num_pending_tokens += 1
        if step.prompt_rows:
            targets = self.cache.stager.to_device([r.prompt_token_ids[p] for r, p in step.prompt_rows], torch.int64)
            top = max(r.params.prompt_logprobs or 0 for r, _ in step.prompt_rows)
            step.prompt_logprobs = tuple(to_host(t) for t in Sampler.logprobs(logits[len(sampled) :], targets, top))
        step.record(self.runner.device)
        return step

    def _process(self, step: StepInFlight) -> list[Request]:
        """Wait for a launched step's tokens and apply them; returns the requests that got one.
        A request that finished (stop condition, abort) after the step was launched has its
        token from it discarded."""
        step.wait()
        now = time.monotonic()  # tokens of this step are known from here on
        # Prompt rows first: a request's last chunk carries both its last prompt rows and its
        # first sampled token, and that token may finish it (max_tokens 1, as scoring clients
        # ask: echo + logprobs; EOS; a stop id). Applied after the token, they would find the
        # request finished and be dropped: its output would lack the last chunk's logprobs.
        # ``is_finished`` here means finished before this step's results: aborted.
        for j, (req, p) in enumerate(step.prompt_rows):
            if not req.prompt_logprobs:
                req.prompt_logprobs.append(None)  # the first prompt token has no logprob
            if req.is_finished or p != len(req.prompt_logprobs):
                continue  # aborted, or a row this request already has (recomputed prompt)
            req.prompt_logprobs.append(_token_logprob(step.prompt_logprobs, j, req.prompt_token_ids[p], req.params.prompt_logprobs or 0))
        touched: list[Request] = []
        if step.sampled:
            toks = step.host_tokens.tolist()
            for i, (req, tok) in enumerate(zip(step.sampled, toks)):
                req.num_pending_tokens -= 1
                if req.is_finished:
                    continue
                if req.params.logprobs is not None:
                    req.logprobs.append(_token_logprob(step.logprobs, i, tok, req.params.logprobs))
                self._append_token(req, tok, now)
                touched.append(req)
        return touched

    def _suppressed(self, req: Request) -> list[int]:
        if req.num_output_tokens >= req.params.min_tokens:
            return []
        ids = list(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            ids.extend(self.eos_token_ids)
        return ids

    def _append_token(self, req: Request, tok: int, now: float) -> None:
        p = req.params
        req.output_token_ids.append(tok)
        if req.first_token_time is None:
            req.first_token_time = now
        self._stats.generation_tokens_total += 1
        detok = self.detok.get(req.request_id)
        # counts of known tokens: with async scheduling the next one may already be pending
        generated = len(req.output_token_ids)
        past_min = generated >= p.min_tokens
        eos = past_min and not p.ignore_eos and tok in self.eos_token_ids
        stop_tok = past_min and tok in p.stop_token_ids
        # a stop token's own text is not the request's, unless include_stop_str_in_output
        shown = detok is not None and (p.include_stop_str_in_output or not (eos or stop_tok))
        stop_str = detok.add(tok, check_stop=past_min) if shown else None
        if req.grammar is not None:
            self.structured.accept(req)  # a no-op when the mask of the next step already advanced it
            if req.grammar.error is not None:
                req.error = req.grammar.error
                self._finish(req, FinishReason.ERROR)
                if detok:
                    detok.flush()
                return
        if stop_str is not None:
            self._finish(req, FinishReason.STOP, stop_str)
        elif eos:
            self._finish(req, FinishReason.STOP, None)
        elif stop_tok:
            self._finish(req, FinishReason.STOP, tok)
        elif req.grammar is not None and req.grammar.terminated:
            self._finish(req, FinishReason.STOP, tok)  # a grammar stop token under ignore_eos
        elif generated >= p.max_tokens or req.num_prompt_tokens + generated >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)
        if detok and req.is_finished and stop_str is None:
            detok.flush()

    def _output(self, req: Request) -> RequestOutput:
        detok = self.detok.get(req.request_id)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=detok.safe_text(req.is_finished) if detok else "",
            finished=req.is_finished,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=req.stop_reason,
            error=req.error,
            logprobs=list(req.logprobs),
            prompt_logprobs=list(req.prompt_logprobs),
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            finished_time=req.finished_time,
            num_preemptions=req.num_preemptions,
        )

    # ---- stats ------------------------------------------------------------------------------

    def reset_peak_running_batch(self) -> None:
        """Start measuring ``peak_running_batch_size`` afresh (benchmarks, after a warm-up)."""
        self._stats.peak_running_batch_size = 0

    def stats(self) -> EngineStats:
        st = self._stats
        st.num_running = len(self.scheduler.running)
        st.num_waiting = len(self.scheduler.waiting)
        st.kv_usage = self.cache.usage
        st.num_preemptions_total = self.scheduler.num_preemptions
        st.num_recall_fallbacks_total = self.scheduler.num_recall_fallbacks
        st.host_kv_usage = self.scheduler.host.usage if self.scheduler.host is not None else 0.0
        seqs = [self.cache.seqs[r.request_id] for r in self.scheduler.running if r.request_id in self.cache.seqs]
        st.kv_tokens_kept = sum(sum(s.lens) for s in seqs)
        st.kv_tokens_seen = sum(s.seen for s in seqs) * self.runner.spec.num_layers
        return EngineStats(**vars(st))


def _token_logprob(lp: LogprobTensors, row: int, token: int, top: int) -> TokenLogprob:
    """Row ``row`` of host-side ``Sampler.logprobs`` output as a ``TokenLogprob`` with ``top``
    alternatives."""
    chosen, ranks, top_ids, top_vals = lp
    alts = list(zip(top_ids[row, :top].tolist(), top_vals[row, :top].tolist())) if top else []
    return TokenLogprob(token, float(chosen[row]), alts, int(ranks[row]))
