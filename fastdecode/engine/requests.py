"""What the Engine checks before it queues a request: everything a request could break later.

A request is either rejected here with a ValueError naming the field, or it can run: its ids are
in the vocabulary, it fits the model's context and the KV cache. No torch beyond reading a
prompt given as a tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.engine.block_manager import cdiv
from fastdecode.engine.params import SamplingParams


def eos_ids(model, vocab_size: int) -> frozenset[int]:
    """The model's EOS ids (generation config first, then the text config).

    Ids outside the vocabulary are dropped: the sampler can never draw them, and masking them
    before ``min_new_tokens`` would index past the logits.
    """
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(t for t in ([eos] if isinstance(eos, int) else eos) if 0 <= t < vocab_size)


class RequestChecks:
    """The limits a request must respect: vocabulary, context, cache size."""

    def __init__(self, vocab_size: int, max_model_len: Optional[int], num_blocks: int,
                 block_size: int, decoder_start: Optional[list[int]] = None) -> None:
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Encoder-decoder models: the prompt goes to the encoder (its blocks fixed), the
        # decoder starts from these tokens.
        self.decoder_start = decoder_start

    def __call__(self, prompt_ids, params) -> tuple[list[int], SamplingParams]:
        """``(prompt as a list of ints, params)``, or a ValueError / TypeError."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._prompt(prompt_ids)
        bad = [t for t in params.stop_token_ids or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids must be token ids in "
                             f"[0, {self.vocab_size}) (the model's vocabulary); got {bad[0]}")
        bad = [t for w in params.bad_words_ids or () for t in w if t >= self.vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.bad_words_ids must be token ids in "
                             f"[0, {self.vocab_size}) (the model's vocabulary); got {bad[0]}")
        # Every decoder token but the last generated one is fed to the model and cached.
        decoded = len(self.decoder_start or prompt) + params.max_new_tokens - 1
        if self.max_model_len is not None:
            decoded = min(decoded, self.max_model_len)
        need = cdiv(decoded, self.block_size)
        if self.decoder_start is not None:
            need += cdiv(len(prompt), self.block_size)  # the encoder's keys and values
        if need > self.num_blocks:
            raise ValueError(f"prompt + max_new_tokens need {need} KV blocks, the cache has "
                             f"{self.num_blocks}")
        return prompt, params

    def _prompt(self, prompt_ids) -> list[int]:
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
        return prompt
