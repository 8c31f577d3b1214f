"""Facts about the installed transformers release that differ between the releases we support.

Each is read off the installed code (a dataclass field, a signature, a source line), never from a
version number, so that a release that moves a detail is followed rather than misread.
"""

from __future__ import annotations

import functools
import inspect

from transformers import generation as hfgen
from transformers.generation import utils as hfutils


@functools.lru_cache(maxsize=None)
def cache_name() -> str:
    """The name ``generate`` keeps the KV cache under in its model kwargs and dict outputs
    (``"cache"`` in newer releases, ``"past_key_values"`` before)."""
    return hfutils.ALL_CACHE_NAMES[0]


def cache_names() -> tuple[str, ...]:
    """Every keyword a caller may pass a cache as: the current name and the deprecated alias."""
    return tuple(dict.fromkeys((cache_name(), "past_key_values")))


@functools.lru_cache(maxsize=None)
def output_cache_field() -> str:
    """The field of ``GenerateDecoderOnlyOutput`` that holds the returned cache."""
    fields = hfgen.GenerateDecoderOnlyOutput.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


@functools.lru_cache(maxsize=None)
def penalty_skips_padding() -> bool:
    """Whether this release's repetition penalty ignores left padding.

    Newer releases pass ``prompt_ignore_length`` (the leading zeros of the mask) to the processor,
    older ones penalise the pad id like any prompt token; fastdecode follows the installed one.
    """
    source = inspect.getsource(hfgen.GenerationMixin._get_logits_processor)
    return "prompt_ignore_length" in source


@functools.lru_cache(maxsize=None)
def bad_words_need_whole_sequence() -> bool:
    """Whether this release applies a banned sequence of n tokens only once the ids so far hold n
    tokens (older releases), rather than its n - 1 prefix tokens."""
    source = inspect.getsource(hfgen.SequenceBiasLogitsProcessor.__call__)
    return "len(sequence_ids) > input_ids.shape[1]" in source


@functools.lru_cache(maxsize=None)
def drops_all_ones_mask() -> bool:
    """Whether ``generate`` replaces an all-ones attention mask by None before the first forward
    (recording its length as ``generation_config._mask_length``)."""
    return "_mask_length" in inspect.getsource(hfgen.GenerationMixin.generate)
