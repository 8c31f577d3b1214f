"""Text around the token streams: incremental detokenization, stop strings, chat prompts.

No FastAPI here: the same classes serve the HTTP server and any other front end.
"""

from __future__ import annotations

from typing import Optional

# Chat prompt used when the tokenizer has no chat template (as the built-in default model): the
# format ``fastdecode chat`` uses, one "Role: content" line per message, then "Assistant:".
FALLBACK_CHAT_FORMAT = "{role}: {content}\n"
FALLBACK_CHAT_PROMPT = "Assistant:"


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template with the assistant turn opened, or,
    without a template, the plain "Role: content" format (``FALLBACK_CHAT_FORMAT``)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = "".join(FALLBACK_CHAT_FORMAT.format(role=m["role"].capitalize(), content=m["content"])
                   for m in messages)
    return tokenizer(text + FALLBACK_CHAT_PROMPT)["input_ids"]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding tokens one by one is wrong for byte-level BPE (a character may span tokens, and
    some tokenizers add a space depending on the previous token), and decoding everything again
    each time costs O(n^2). Instead it decodes a short window: the text of the tokens since the
    last emitted boundary, minus the text those tokens had before the new ones came. A delta
    ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the next token
    completes it.
    """

    def __init__(self, tokenizer, prompt_ids: Optional[list[int]] = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        # A few prompt tokens give the first generated token its context (e.g. a leading space).
        context = list(prompt_ids or [])[-4:]
        self.ids += context
        self._prefix = 0
        self._read = len(context)

    def push(self, new_ids: list[int]) -> str:
        """The text the new tokens add (possibly "" while a character is incomplete)."""
        self.ids += new_ids
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(before):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StopStrings:
    """Finds stop strings in streamed text, holding back what might be the start of one.

    ``feed(delta)`` returns ``(text safe to emit now, stopped)``; on a stop the text ends
    before the stop string (which is not returned, as in OpenAI's API). ``flush()`` returns
    the held-back tail once the request ended otherwise.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        self._buffer += delta
        hits = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buffer = self._buffer[:min(hits)], ""
            return out, True
        cut = max(0, len(self._buffer) - self._hold)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return out
