"""``fastdecode.Engine``: continuous batching over a paged KV cache, driven by its caller."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sequence as Seq, Union

import torch
from tqdm.auto import tqdm

from fastdecode.engine.block_manager import BlockManager, cdiv
from fastdecode.engine.model_runner import ModelRunner
from fastdecode.engine.params import RequestOutput, SamplingParams
from fastdecode.engine.scheduler import Scheduler
from fastdecode.engine.sequence import Sequence

# Free blocks kept back when admitting new requests, so that running ones can grow a while
# before anything is preempted (vLLM's default).
_WATERMARK = 0.01


def _eos_ids(model) -> frozenset[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class Engine:
    """Serve many requests at once over one model.

    ``step()`` runs one forward pass over a batch mixing one decode token per running request
    and chunks of prompts (at most ``max_batch_tokens`` tokens, ``max_num_seqs`` requests), then
    one sampling call with every request's own parameters. ``num_blocks=None`` sizes the KV
    cache from the memory free now (see :func:`fastdecode.engine.model_runner.default_num_blocks`:
    80% of free GPU memory; on CPU a quarter of the available RAM, at most 8 GiB).
    ``kv_dtype`` defaults to the model's dtype, ``device`` to the model's device.
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_num_seqs: int = 256, max_batch_tokens: int = 2048,
                 kv_dtype: Optional[torch.dtype] = None, device=None) -> None:
        if block_size < 1 or (num_blocks is not None and num_blocks < 1):
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size}, "
                             f"{num_blocks}")
        self.runner = ModelRunner(model, block_size=block_size, num_blocks=num_blocks,
                                  max_num_seqs=max_num_seqs, kv_dtype=kv_dtype, device=device)
        self.blocks = BlockManager(self.runner.num_blocks, block_size, watermark=_WATERMARK)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=max_batch_tokens)
        cfg = model.config.get_text_config()
        self.vocab_size: int = cfg.vocab_size
        self.max_model_len: Optional[int] = getattr(cfg, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(model)
        self._requests: dict[str, Sequence] = {}  # every unfinished request
        self._aborted: list[Sequence] = []         # reported by the next step()
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._last_batch = (0, 0)
        self._generated = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that cannot run."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_ids, params)
        if request_id is None:
            # Generated ids are never reused, so outputs of a finished request stay unambiguous.
            request_id = next(r for r in (f"req-{n}" for n in self._ids)
                              if r not in self._requests)
        elif not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        elif request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stop = frozenset(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop |= self.eos_ids
        seq = Sequence(request_id, prompt, params, next(self._arrivals), stop)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _check_prompt(self, prompt_ids, params: SamplingParams) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.is_floating_point():
                raise ValueError(f"prompt_ids must be a 1-D integer tensor, got "
                                 f"{prompt_ids.dtype} {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids is empty")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids must be token ids in [0, {self.vocab_size}); got "
                             f"{bad[0]!r}")
        if self.max_model_len is not None and len(prompt) > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, more than the model's context "
                             f"(max_position_embeddings={self.max_model_len})")
        # Every token but the last generated one is fed to the model and cached.
        cached = len(prompt) + params.max_new_tokens - 1
        if self.max_model_len is not None:
            cached = min(cached, self.max_model_len)
        need = cdiv(cached, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_new_tokens need {need} KV blocks, the cache has "
                             f"{self.blocks.num_blocks}")
        return prompt

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks now; the next ``step()`` reports it as "abort".
        Unknown or already finished ids are ignored (the request may have just completed)."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self._aborted.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._aborted)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One scheduling step; an output for each request that got tokens or finished."""
        outputs = [seq.take_output() for seq in self._aborted]
        self._aborted.clear()
        batch = self.scheduler.schedule()
        self._last_batch = (batch.num_prefill_tokens, batch.num_decode_tokens)
        if not batch.seqs:
            return outputs
        tokens = self.runner.execute(batch)
        for seq, n, tok in zip(batch.seqs, batch.num_new, tokens):
            seq.num_computed += n
            if tok is None:
                continue
            if tok < 0:
                self.scheduler.finish(seq, "error")
            else:
                seq.token_ids.append(tok)
                self._generated += 1
                reason = self._finish_reason(seq, tok)
                if reason is not None:
                    self.scheduler.finish(seq, reason)
            if seq.is_finished:
                del self._requests[seq.request_id]
            outputs.append(seq.take_output())
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        if tok in seq.stop_ids:  # masked by the sampler before min_new_tokens
            return "stop"
        if seq.num_generated >= seq.params.max_new_tokens:
            return "length"
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # ------------------------------------------------------------------ drivers
    def generate(self, prompts, params: Union[None, SamplingParams, Seq[SamplingParams]] = None,
                 *, progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion; their final outputs in input order.

        params: one SamplingParams for all, or a list with one per prompt. Requests queued
        before keep running alongside, their outputs are not returned here.
        """
        prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for rid in ids:  # all or nothing: withdraw what was queued before the bad prompt
                self.scheduler.finish(self._requests.pop(rid), "abort")
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), disable=not progress, desc="requests") as bar:
            pending = set(ids)
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in ids]

    def stream(self, prompt_ids, params: Optional[SamplingParams] = None
               ) -> Iterator[RequestOutput]:
        """Yield the request's output each step it gets tokens, until it finishes. Closing the
        iterator early aborts the request."""
        rid = self.add_request(prompt_ids, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)

    @property
    def stats(self) -> dict[str, int]:
        """Requests running / waiting, KV blocks free, preemptions so far, the last step's
        prefill / decode token counts and the tokens generated so far."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "free_blocks": self.blocks.num_free_blocks, "num_blocks": self.blocks.num_blocks,
                "preemptions": self.scheduler.num_preemptions,
                "prefill_tokens": self._last_batch[0], "decode_tokens": self._last_batch[1],
                "generated_tokens": self._generated}
