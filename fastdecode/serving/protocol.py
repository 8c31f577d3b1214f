"""OpenAI request bodies and their mapping to :class:`~fastdecode.SamplingParams`.

Numeric sampling fields are checked by the shared rule table (:mod:`fastdecode.ops._rules`), so
the server accepts exactly what ``SamplingParams`` and the ops accept, with the same messages,
naming the request field. Fields of OpenAI's API that this server cannot honour are refused
with a 400 naming them, never ignored. Beyond OpenAI's fields (as vLLM): ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, and the
speculative-decoding fields of ``SamplingParams``: ``prompt_lookup_num_tokens``,
``num_speculative_tokens`` (for an engine given a draft model).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, field_validator

from fastdecode.engine import SamplingParams
from fastdecode.ops import _rules

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 128  # OpenAI's limit on n


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, *, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.kind = kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": None}}


class _Sampling(BaseModel):
    # Unknown fields are refused: a misspelt option must not be silently dropped.
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    max_tokens: Any = None
    temperature: Any = None
    top_p: Any = None
    n: Any = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[None, str, list[str]] = None
    seed: Any = None
    presence_penalty: Any = 0
    frequency_penalty: Any = 0
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    # Extensions.
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    min_tokens: Any = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    prompt_lookup_num_tokens: Any = None
    num_speculative_tokens: Any = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"stop must be a string or a list of at most "
                               f"{MAX_STOP_STRINGS} strings; got {len(stops)}", param="stop")
        return stops

    def _max_tokens(self) -> Any:
        return self.max_tokens

    def num_choices(self) -> int:
        """``n``: how many completions to draw for the prompt."""
        n = 1 if self.n is None else self.n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise RequestError(f"n must be an integer in [1, {MAX_CHOICES}]; got "
                               f"{_rules.short_repr(n)}", param="n")
        return n

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def _unsupported(self) -> dict[str, bool]:
        """Fields set to something this server cannot do."""
        return {"presence_penalty": self.presence_penalty not in (None, 0),
                "frequency_penalty": self.frequency_penalty not in (None, 0),
                "logit_bias": bool(self.logit_bias)}

    def sampling_params(self, prompt_len: int, max_model_len: Optional[int],
                        default_max_tokens: Optional[int]) -> SamplingParams:
        """The request's SamplingParams; RequestError names the first bad field.

        ``max_tokens`` defaults to ``default_max_tokens``, or (None) to the rest of the context.
        """
        for name, bad in self._unsupported().items():
            if bad:
                hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
                raise RequestError(f"{name}={_rules.short_repr(getattr(self, name))} is not "
                                   f"supported by this server{hint}", param=name)
        max_tokens = self._max_tokens()
        if max_tokens is None:
            max_tokens = default_max_tokens
        if max_tokens is None and max_model_len is not None:
            max_tokens = max(1, max_model_len - prompt_len)
        fields = {"max_new_tokens": ("max_tokens", max_tokens),
                  "temperature": ("temperature", self.temperature),
                  "top_p": ("top_p", self.top_p), "top_k": ("top_k", self.top_k),
                  "min_p": ("min_p", self.min_p),
                  "repetition_penalty": ("repetition_penalty", self.repetition_penalty),
                  "min_new_tokens": ("min_tokens", self.min_tokens), "seed": ("seed", self.seed)}
        kwargs = {}
        for rule, (field, value) in fields.items():
            if value is not None:
                try:
                    kwargs[rule] = _rules.check(rule, value, label=field)
                except ValueError as exc:
                    raise RequestError(str(exc), param=field) from None
        low, high = kwargs.get("min_new_tokens", 0), kwargs.get("max_new_tokens", 16)
        if low > high:
            raise RequestError(f"min_tokens must be at most max_tokens={high}; got {low}",
                               param="min_tokens")
        speculation = ("num_speculative_tokens", "prompt_lookup_num_tokens")
        for name in speculation:
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        try:
            return SamplingParams(**kwargs, ignore_eos=self.ignore_eos,
                                  stop_token_ids=self.stop_token_ids)
        except ValueError as exc:  # what is left to refuse: negative stop ids, speculation
            message = str(exc).replace("SamplingParams.", "")
            param = next((name for name in speculation if name in message), "stop_token_ids")
            raise RequestError(message, param=param) from None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def _unsupported(self) -> dict[str, bool]:
        return {**super()._unsupported(), "echo": self.echo, "logprobs": self.logprobs is not None,
                "best_of": self.best_of not in (None, 1), "suffix": self.suffix is not None}

    def single_prompt(self) -> Union[str, list[int]]:
        """The one prompt (a string or token ids); batches of prompts are refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError(f"prompt: batches of prompts are not supported (got "
                                   f"{len(p)}); send one request per prompt", param="prompt")
            p = p[0]
        if not p:
            raise RequestError("prompt is empty", param="prompt")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; content is a string or a list of text parts (no images or audio)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
        return {"role": self.role, "content": content,
                **({"name": self.name} if self.name else {})}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Any = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def _unsupported(self) -> dict[str, bool]:
        return {**super()._unsupported(), "logprobs": bool(self.logprobs),
                "top_logprobs": self.top_logprobs is not None, "tools": bool(self.tools),
                "response_format": (self.response_format or {}).get("type", "text") != "text"}

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must hold at least one message")
        return messages

    def _max_tokens(self) -> Any:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens
