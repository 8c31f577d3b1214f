"""State of one request inside the Engine (no torch here: the scheduler reasons on lists)."""

from __future__ import annotations

import enum
import hashlib
from array import array
from typing import Optional

from fastdecode.engine.params import RequestOutput, SamplingParams, TokenView


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request's tokens, its place in the KV cache and its progress.

    ``token_ids`` = prompt + generated tokens. The first ``num_computed`` of them have their keys
    and values in the cache blocks listed in ``block_table``; the rest are fed to the model by
    the next steps (the whole prompt at first, one token per decode step, everything again after
    a preemption, which frees the blocks and resets ``num_computed`` to 0).
    ``arrival`` orders requests for FIFO admission and newest-first preemption. ``stop_ids``:
    the tokens that end the request (EOS unless ignored, and the request's stop ids).
    ``block_hashes``: the prefix-cache hash of each full block of ``token_ids`` (filled by the
    block manager when caching is on); the first ``num_cached_blocks`` blocks of the table are
    in the prefix cache already.

    Encoder-decoder requests: ``encoder_ids`` is the prompt the caller gave (reported as the
    output's ``prompt_ids``), ``prompt_ids`` the decoder's start. ``cross_table`` lists the
    read-only blocks of the encoder's keys and values (allocated at admission, freed with the
    decoder's blocks); ``encoded``: a step wrote them. ``hash_seed`` starts the prefix-cache
    hash chain: the encoder ids' hash, since every decoder key past the first layer depends on
    them (empty for decoder-only requests).
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: int, stop_ids: frozenset[int],
                 encoder_ids: Optional[list[int]] = None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.encoder_ids = encoder_ids
        self.cross_table: list[int] = []
        self.encoded = False
        self.hash_seed = b"" if encoder_ids is None else hashlib.blake2b(
            array("q", encoder_ids).tobytes(), digest_size=16, person=b"encoder").digest()
        self.params = params
        self.arrival = arrival
        self.stop_ids = stop_ids
        self.token_ids: list[int] = list(prompt_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None  # why it failed, with finish_reason "error"
        self.num_reported = 0  # generated tokens already handed out in a RequestOutput

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the whole prompt at first, then 1 per decode step."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error

    def take_output(self) -> RequestOutput:
        """The request's state, with the tokens generated since the last call as ``new_ids``
        (a copy of those alone) and every generated token as a view (``token_ids`` only
        grows)."""
        first, end = len(self.prompt_ids), len(self.token_ids)
        new = self.token_ids[first + self.num_reported:]
        self.num_reported = end - first
        prompt = self.prompt_ids if self.encoder_ids is None else self.encoder_ids
        return RequestOutput(self.request_id, prompt,
                             TokenView(self.token_ids, first, end), new, self.is_finished,
                             self.finish_reason, self.error)
