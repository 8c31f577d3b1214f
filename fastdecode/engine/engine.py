"""``fastdecode.Engine``: continuous batching over a paged KV cache, driven by its caller."""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence as Seq, Union

import torch
from tqdm.auto import tqdm

from fastdecode.engine.block_manager import BlockManager
from fastdecode.engine.model_runner import ModelRunner
from fastdecode.engine.params import RequestOutput, SamplingParams
from fastdecode.engine.requests import RequestChecks, eos_ids
from fastdecode.engine.scheduler import Scheduler
from fastdecode.engine.sequence import Sequence

# Free blocks kept back when admitting new requests, so that running ones can grow a while
# before anything is preempted (vLLM's default).
_WATERMARK = 0.01


class Engine:
    """Serve many requests at once over one model.

    ``step()`` runs one forward pass over a batch mixing one decode token per running request
    and chunks of prompts (at most ``max_batch_tokens`` tokens, ``max_num_seqs`` requests), then
    one sampling call with every request's own parameters. ``num_blocks=None`` sizes the KV
    cache from the memory free now (see :func:`fastdecode.engine.model_runner.default_num_blocks`:
    80% of free GPU memory; on CPU a quarter of the available RAM, at most 8 GiB).
    ``kv_dtype`` defaults to the model's dtype, ``device`` to the model's device.

    Prefix caching (``enable_prefix_caching``, on by default): full KV blocks are kept, keyed by
    a hash chain of their tokens, and shared by reference with later requests whose prompts
    start with the same tokens (a shared system prompt, a conversation's earlier turns, a
    request sent again), also blocks that the same step fills for an earlier request (a burst
    with one system prompt computes it once); cached blocks nobody holds are reused least
    recently freed first.
    ``stats["prefix_cache_hit_rate"]``: the fraction of the admitted requests' tokens found
    cached.

    Speculative decoding per request: ``SamplingParams.prompt_lookup_num_tokens``, or, with
    ``draft_model`` (a smaller causal LM of the same vocabulary), ``num_speculative_tokens``.
    The draft model runs every step over the step's tokens, on a KV cache of its own with the
    target's block count and block size (the same block tables), and drafts greedily.

    Encoder-decoder models (T5, BART, Marian): a request's prompt is the encoder's input, its
    decoder starts from the model's decoder start token; the encoder runs at admission and its
    keys / values take a fixed number of the same cache's blocks (see
    :mod:`fastdecode.engine.encoder`). Not with speculative decoding.

    Threads. ``add_request``, ``abort``, ``has_unfinished`` and ``stats`` may be called from any
    thread, also while another thread is inside ``step()``: a request added then joins the next
    step; one aborted then has its blocks freed at once and its tokens of that step dropped. The
    forward pass runs outside the engine's lock, so they never wait for the model. One thread
    steps at a time: ``step()``, ``generate()`` or ``stream()`` called while a step runs raises
    RuntimeError at once rather than waiting.

    Outputs. Every request ends with exactly one final output (``finished=True``). ``step()``
    returns one output per request that got tokens or ended since it was last reported (its
    ``new_ids``: the tokens since then), including requests aborted meanwhile and requests that
    ended while ``generate()`` / ``stream()`` stepped for other requests. ``generate()`` and
    ``stream()`` report their own requests; if they exit early (an error, Ctrl-C, a stream
    closed) their unfinished requests are aborted and ``step()`` reports them. When ``step()``
    raises (e.g. the model's forward failed), nothing is lost: pending outputs come with the
    next call, and stepping again retries the same work. A request whose sampling or
    bookkeeping fails ends alone with finish_reason "error" and ``RequestOutput.error`` naming
    it; the others go on.
    """

    # What runs each step; a subclass may run it elsewhere too (tensor parallelism broadcasts it).
    runner_class: type[ModelRunner] = ModelRunner

    def __init__(self, model, *, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_num_seqs: int = 256, max_batch_tokens: int = 2048,
                 kv_dtype: Optional[torch.dtype] = None, device=None,
                 enable_prefix_caching: bool = True, draft_model=None) -> None:
        if block_size < 1 or (num_blocks is not None and num_blocks < 1):
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size}, "
                             f"{num_blocks}")
        runner_class = self.runner_class
        if getattr(model.config, "is_encoder_decoder", False):
            if runner_class is not ModelRunner:
                raise ValueError(f"{type(self).__name__} does not run encoder-decoder models")
            # Imported here so that ``import fastdecode`` does not pull in transformers.
            from fastdecode.engine.encoder import EncoderDecoderRunner
            runner_class = EncoderDecoderRunner
        self.runner = runner_class(model, block_size=block_size, num_blocks=num_blocks,
                                   max_num_seqs=max_num_seqs, kv_dtype=kv_dtype, device=device)
        if draft_model is not None:
            if self.runner_class is not ModelRunner:
                raise ValueError(f"draft_model is not supported by {type(self).__name__}")
            self.runner.attach_draft(draft_model)
        cfg = model.config.get_text_config()
        self.vocab_size: int = cfg.vocab_size
        self.max_model_len: Optional[int] = getattr(cfg, "max_position_embeddings", None)
        self.eos_ids = eos_ids(model, self.vocab_size)
        self.blocks = BlockManager(self.runner.num_blocks, block_size, watermark=_WATERMARK,
                                   enable_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=max_batch_tokens,
                                   max_model_len=self.max_model_len)
        self._check = RequestChecks(self.vocab_size, self.max_model_len, self.runner.num_blocks,
                                    block_size, self.runner.decoder_start)
        # _lock guards every structure below and the scheduler's; _stepping admits one stepper.
        self._lock = threading.RLock()
        self._stepping = threading.Lock()
        self._requests: dict[str, Sequence] = {}  # every unfinished request
        self._pending: dict[str, Sequence] = {}   # progress not reported yet (finished ones too)
        self._claimed: set[str] = set()  # reported by the generate() / stream() running them
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._last_batch = (0, 0)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that cannot run
        (bad ids, stop ids outside the vocabulary, too long for the context or the cache)."""
        return self._add(prompt_ids, params, request_id, claim=False).request_id

    def _add(self, prompt_ids, params: Optional[SamplingParams], request_id: Optional[str],
             claim: bool) -> Sequence:
        prompt, params = self._check(prompt_ids, params)
        start = self.runner.decoder_start
        if start is not None and (params.prompt_lookup_num_tokens
                                  or params.num_speculative_tokens):
            raise ValueError("SamplingParams.prompt_lookup_num_tokens / num_speculative_tokens: "
                             "speculative decoding is not supported with encoder-decoder models")
        if params.num_speculative_tokens and self.runner.draft is None:
            raise ValueError("SamplingParams.num_speculative_tokens needs a draft model: "
                             "Engine(model, draft_model=...)")
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        stop = frozenset(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop |= self.eos_ids
        with self._lock:
            if request_id is None:
                # Generated ids are never reused, so outputs of a finished request stay
                # unambiguous.
                request_id = next(r for r in (f"req-{n}" for n in self._ids)
                                  if not self._in_use(r))
            elif self._in_use(request_id):
                raise ValueError(f"request_id {request_id!r} is already in use")
            if start is None:
                seq = Sequence(request_id, prompt, params, next(self._arrivals), stop)
            else:
                seq = Sequence(request_id, list(start), params, next(self._arrivals), stop,
                               encoder_ids=prompt)
            self._requests[request_id] = seq
            if claim:
                self._claimed.add(request_id)
            self.scheduler.add(seq)
        return seq

    def _in_use(self, request_id: str) -> bool:
        """Running, or finished with its final output not yet handed out."""
        return request_id in self._requests or request_id in self._pending

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks now; the next ``step()`` reports it as "abort".
        Unknown or already finished ids are ignored (the request may have just completed)."""
        with self._lock:
            seq = self._requests.get(request_id)
            if seq is not None:
                self._end(seq, "abort")

    def _end(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        del self._requests[seq.request_id]
        self._pending[seq.request_id] = seq

    def has_unfinished(self) -> bool:
        """Whether a request is running or waiting, or an output is waiting for ``step()``."""
        with self._lock:
            return bool(self._requests) or any(r not in self._claimed for r in self._pending)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One scheduling step; an output for each request that got tokens or ended since it
        was last reported."""
        with self._exclusive():
            self._advance()
            return self._report(None)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._stepping.acquire(blocking=False):
            self._refuse()
        try:
            yield
        finally:
            self._stepping.release()

    def _refuse(self) -> None:
        raise RuntimeError("Engine.step() is already running (in another thread, or in "
                           "generate() / stream()): one thread steps at a time; add_request() "
                           "and abort() may be called from any thread")

    def _advance(self) -> None:
        with self._lock:
            batch = self.scheduler.schedule()
            self._last_batch = (batch.num_prefill_tokens, batch.num_decode_tokens)
            if not batch.seqs:
                return
            inputs = self.runner.prepare(batch)
        tokens, errors = self.runner.run(inputs)  # unlocked: add_request / abort go on
        with self._lock:
            for seq in self.scheduler.postprocess(batch, tokens, errors):
                if seq.is_finished:
                    del self._requests[seq.request_id]
                self._pending[seq.request_id] = seq

    def _report(self, request_ids: Optional[Iterable[str]]) -> list[RequestOutput]:
        """Hand out pending outputs: of ``request_ids``, or of every unclaimed request."""
        with self._lock:
            if request_ids is None:
                picked = [s for r, s in self._pending.items() if r not in self._claimed]
            else:
                picked = [self._pending[r] for r in request_ids if r in self._pending]
            for seq in picked:
                del self._pending[seq.request_id]
            return [seq.take_output() for seq in picked]

    # ------------------------------------------------------------------ drivers
    def generate(self, prompts, params: Union[None, SamplingParams, Seq[SamplingParams]] = None,
                 *, progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion; their final outputs in input order.

        params: one SamplingParams for all, or a list with one per prompt. All or nothing: a
        bad prompt raises before any runs. Requests queued before keep running alongside; their
        outputs are left for ``step()``. On an exception (Ctrl-C included) the prompts' unfinished
        requests are aborted, and ``step()`` reports every one of them.
        """
        prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if self._stepping.locked():
            self._refuse()  # before queueing anything (a race past this check aborts them)
        seqs: list[Sequence] = []
        try:
            for prompt, p in zip(prompts, params):
                seqs.append(self._add(prompt, p, None, claim=True))
        except Exception:
            self._withdraw(seqs)
            raise
        ids = [s.request_id for s in seqs]
        finals: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), disable=not progress, desc="requests") as bar:
                while len(finals) < len(ids):
                    for out in self._drive(ids):
                        if out.finished:
                            finals[out.request_id] = out
                            bar.update(1)
        finally:
            self._release(seqs, delivered=len(finals) == len(ids))
        return [finals[rid] for rid in ids]

    def stream(self, prompt_ids, params: Optional[SamplingParams] = None
               ) -> Iterator[RequestOutput]:
        """Yield the request's output each step it gets tokens, until it finishes. Closing the
        iterator early aborts the request (``step()`` then reports the abort)."""
        if self._stepping.locked():
            self._refuse()
        seq = self._add(prompt_ids, params, None, claim=True)
        done = False
        try:
            while not done:
                for out in self._drive([seq.request_id]):
                    done = out.finished
                    yield out
        finally:
            self._release([seq], delivered=done)

    def _drive(self, request_ids: list[str]) -> list[RequestOutput]:
        with self._exclusive():
            self._advance()
            return self._report(request_ids)

    def _release(self, seqs: list[Sequence], delivered: bool) -> None:
        """A driver is done with ``seqs``: ``step()`` reports them from now on. Unfinished ones
        are aborted; unless the driver ``delivered`` their final outputs, finished ones are
        reported again (with their full output) so that none is lost."""
        with self._lock:
            for seq in seqs:
                self._claimed.discard(seq.request_id)
                if seq.request_id in self._requests:
                    self._end(seq, "abort")
                elif not delivered:
                    self._pending[seq.request_id] = seq

    def _withdraw(self, seqs: list[Sequence]) -> None:
        """Take back requests whose ids the caller never saw: no output at all."""
        with self._lock:
            for seq in seqs:
                self._claimed.discard(seq.request_id)
                self._pending.pop(seq.request_id, None)  # aborted by a thread that guessed its id
                if self._requests.pop(seq.request_id, None) is not None:
                    self.scheduler.finish(seq, "abort")

    @property
    def stats(self) -> dict[str, Union[int, float]]:
        """Requests running / waiting, KV blocks free (cached blocks nobody holds count as
        free), preemptions so far, the last step's prefill / decode token counts, the tokens
        generated so far, the prefix cache: blocks cached, tokens looked up and found, and
        speculative decoding: draft tokens verified and accepted so far."""
        with self._lock:
            return {"running": len(self.scheduler.running),
                    "waiting": len(self.scheduler.waiting),
                    "free_blocks": self.blocks.num_free_blocks,
                    "num_blocks": self.blocks.num_blocks,
                    "preemptions": self.scheduler.num_preemptions,
                    "prefill_tokens": self._last_batch[0], "decode_tokens": self._last_batch[1],
                    "generated_tokens": self.scheduler.num_generated,
                    "cached_blocks": self.blocks.num_cached_blocks,
                    "prefix_cache_queries": self.blocks.num_queried_tokens,
                    "prefix_cache_hits": self.blocks.num_hit_tokens,
                    "prefix_cache_hit_rate": self.blocks.hit_rate,
                    "draft_tokens": self.scheduler.num_draft_tokens,
                    "accepted_draft_tokens": self.scheduler.num_accepted_drafts}
