"""Small random-weight models and offline tokenizers for the tests and the benchmarks.

Nothing here downloads anything: models are built from transformers config classes with a fixed
seed, tokenizers from the ``tokenizers`` library.
"""

from __future__ import annotations

import string

import torch
import transformers

# Shapes are awkward on purpose (odd head counts, GQA ratios 2 and 3, vocab not a power of two).
_COMMON = dict(vocab_size=211, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=2, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=3)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    # A window shorter than the prompts in the tests, so that it changes the result.
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1,
                                      sliding_window=7)),
    # Eager attention: some releases default Gemma2 to SDPA, which silently drops the softcap.
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                    sliding_window=6, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=30.0, query_pre_attn_scalar=64,
                                    attn_implementation="eager")),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, rotary_pct=0.5)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, word_embed_proj_dim=64)),
    # Attention outside AttentionInterface (generic path).
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)),
    # Attention sinks (s_aux), which the paged kernels do not implement: generic path too.
    "gpt_oss": ("GptOssConfig", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                     max_position_embeddings=4096)),
}
FAMILIES = tuple(_FAMILIES)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               **overrides) -> transformers.PreTrainedModel:
    """A random-weight ``*ForCausalLM`` of ``family`` (one of :data:`FAMILIES`), in eval mode.

    Weights are drawn with a larger std than the default init so that logits are far from ties.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    cls_name, shape = _FAMILIES[family]
    kwargs = {**_COMMON, **shape, "initializer_range": 0.08, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    return _build(config, dtype, seed)


def default_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> transformers.PreTrainedModel:
    """The 135M-parameter Llama-shaped model used across the benchmarks (random weights)."""
    config = transformers.LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=2048)
    return _build(config, dtype, seed)


def _build(config, dtype: torch.dtype, seed: int) -> transformers.PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# Encoder-decoder models: T5 with ReLU and a tied head, Flan-T5's gated-GELU with an untied
# head, BART, Marian. A short relative_attention_max_distance so that generations run past it
# (T5's buckets saturate there).
_SEQ2SEQ_COMMON = dict(vocab_size=211, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
_T5 = dict(d_model=48, d_kv=12, d_ff=80, num_layers=3, num_heads=5,
           relative_attention_num_buckets=8, relative_attention_max_distance=20)
_BART = dict(d_model=48, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
             max_position_embeddings=128, init_std=0.1, forced_eos_token_id=None)
_SEQ2SEQ: dict[str, tuple[str, str, dict]] = {
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(_T5, feed_forward_proj="relu")),
    "flan_t5": ("T5Config", "T5ForConditionalGeneration",
                # a smaller init: the untied head is not scaled by d_model ** -0.5
                dict(_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     initializer_factor=0.3)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(_BART, bos_token_id=1, forced_bos_token_id=None)),
    "marian": ("MarianConfig", "MarianMTModel", _BART),
}
SEQ2SEQ = tuple(_SEQ2SEQ)


def tiny_seq2seq(family: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                 **overrides) -> transformers.PreTrainedModel:
    """A random-weight encoder-decoder model of ``family`` (one of :data:`SEQ2SEQ`), eval mode."""
    if family not in _SEQ2SEQ:
        raise ValueError(f"unknown family {family!r}; choose from {SEQ2SEQ}")
    config_name, model_name, shape = _SEQ2SEQ[family]
    config = getattr(transformers, config_name)(**{**_SEQ2SEQ_COMMON, **shape, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).to(dtype)
    return model.eval()


def flan_t5_base(dtype: torch.dtype = torch.float32, seed: int = 0) -> transformers.PreTrainedModel:
    """A Flan-T5-base-shaped model (248M parameters, random weights)."""
    return tiny_seq2seq("flan_t5", dtype, seed, vocab_size=32128, d_model=768, d_kv=64,
                        d_ff=2048, num_layers=12, num_heads=12, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, eos_token_id=1)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (ids 0..3 special), built offline."""
    return _wrap(list(string.printable), character_level=True)


def word_tokenizer(words: list[str] | None = None) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (default: a small fixed vocabulary)."""
    words = words or ("the a of to and in is it you that he was for on are with as his they be "
                      "at one have this from or had by hot word but what some we can out other "
                      "were all there when up use your how said an each she stop end").split()
    return _wrap(words, character_level=False)


def _wrap(symbols: list[str], character_level: bool) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for sym in symbols:
        vocab.setdefault(sym, len(vocab))
    if character_level:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", padding_side="left")
