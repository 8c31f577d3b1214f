"""Models with known behaviour for the speculative-decoding tests."""

from __future__ import annotations

from tiny import tiny_model


def echo_model(scale: float = 1.0):
    """A Llama whose layers add nothing (output projections zeroed) and whose head is its
    embedding times ``scale``: the last token is the likeliest next one (greedy repeats it; a
    smaller scale makes the distribution flatter)."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data * scale)
    return model
