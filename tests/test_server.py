"""The OpenAI-compatible server on loopback, driven by the official ``openai`` client: completion,
chat, streaming, stop strings, seeds, bad fields, API key, a full queue, client disconnect."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import openai
import pytest
import requests
import torch

from fastdecode import AsyncEngine, Engine, SamplingParams
from fastdecode.hf.frontend import load as load_checkpoint
from fastdecode.serving.server import build_app
from fastdecode.serving.text import chat_prompt_ids
from serving_helpers import free_port, running, wait_until

PROMPT = "Return the"
NAME = "tiny"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(1)
    return load_checkpoint(None, "cpu", torch.float32)


@pytest.fixture(scope="module")
def reference(model_and_tokenizer):
    """Greedy ids of PROMPT (24 new tokens) and of the chat prompt, from a plain Engine."""
    model, tok = model_and_tokenizer
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    chat = chat_prompt_ids(tok, [{"role": "user", "content": "Hello"}])
    outs = Engine(model, num_blocks=64).generate([tok(PROMPT)["input_ids"], chat], params)
    return [o.output_ids for o in outs]


@pytest.fixture(scope="module")
def served(model_and_tokenizer, reference):
    model, tok = model_and_tokenizer
    with AsyncEngine(model, num_blocks=128, block_size=16, max_num_seqs=4, max_queued=1) as eng:
        with running(build_app(eng, tok, model_name=NAME)) as url:
            yield eng, url


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def idle(eng: AsyncEngine) -> bool:
    s = eng.stats
    return s["running"] == 0 and s["in_flight"] == 0 and s["free_blocks"] == s["num_blocks"]


def text_of(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def test_models_health_and_metrics(client, served):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert requests.get(served[1] + "/health").json() == {"status": "ok"}
    metrics = requests.get(served[1] + "/metrics").text
    for name in ("fastdecode_requests_running", "fastdecode_requests_waiting",
                 "fastdecode_kv_cache_usage", "fastdecode_prefix_cache_hit_rate",
                 "fastdecode_generation_tokens_per_second", "fastdecode_generation_tokens_total",
                 "fastdecode_time_to_first_token_seconds_bucket",
                 "fastdecode_inter_token_latency_seconds_bucket"):
        assert name in metrics


def test_completion_is_the_engines_greedy_text(client, model_and_tokenizer, reference):
    tok = model_and_tokenizer[1]
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == text_of(tok, reference[0])
    assert r.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == len(reference[0])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_completion_matches_the_whole_one(client):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # incremental
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_fallback_format_and_streams(client, model_and_tokenizer, reference):
    tok = model_and_tokenizer[1]
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text_of(tok, reference[1])
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"},
                                          {"type": "text", "text": "lo"}]}]
    stream = client.chat.completions.create(model=NAME, messages=parts, max_tokens=24,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)


def test_chat_n_choices_stream_by_index(client, model_and_tokenizer, reference):
    expected = text_of(model_and_tokenizer[1], reference[1])
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                       temperature=0, n=2)
    assert [(c.index, c.message.content) for c in r.choices] == [(0, expected), (1, expected)]
    chunks = [c.choices[0] for c in client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0, n=2, stream=True)]
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == expected


def test_chat_template_of_the_tokenizer_is_used(model_and_tokenizer):
    tok = model_and_tokenizer[1]
    messages = [{"role": "user", "content": "Hi"}]
    fallback = chat_prompt_ids(tok, messages)
    assert fallback == tok("User: Hi\nAssistant:")["input_ids"]
    templated = type(tok).from_pretrained(tok.name_or_path)
    templated.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}>>"
    assert chat_prompt_ids(templated, messages) == templated("<user>Hi>>",
                                                             add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("stream, lookup", [(False, 0), (True, 0), (False, 3), (True, 3)])
def test_stop_string_ends_the_text_before_it(client, stream, lookup):
    """Also with prompt lookup, whose steps may bring several tokens past the stop string."""
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24,
                                      temperature=0).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    expected = whole[:whole.index(stop)]
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                  stop=[stop, "never appears"], stream=stream,
                                  extra_body={"prompt_lookup_num_tokens": lookup})
    if stream:
        chunks = [c.choices[0] for c in r]
        text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
    else:
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == expected and reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def draw(seed):
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20,
                                         temperature=1.0, seed=seed).choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(7), draw(8), draw(9)}) > 1


def test_n_choices_draw_with_consecutive_seeds(client, model_and_tokenizer, reference):
    def create(**kwargs):
        return client.completions.create(model=NAME, prompt=PROMPT, **{"max_tokens": 12, **kwargs})

    r = create(n=3, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # Choice i is the request with seed 7 + i alone.
    alone = [create(temperature=1.0, seed=7 + i) for i in range(3)]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    greedy = create(n=2, temperature=0, max_tokens=24)
    tok = model_and_tokenizer[1]
    assert [c.text for c in greedy.choices] == [text_of(tok, reference[0])] * 2


def test_n_choices_stream_by_index(client, served):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, n=3,
                                      temperature=1.0, seed=11)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, n=3,
                                            temperature=1.0, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    for c in whole.choices:
        mine = [x.choices[0] for x in chunks if x.choices and x.choices[0].index == c.index]
        assert "".join(x.text for x in mine) == c.text
        reasons = [x.finish_reason for x in mine]
        assert reasons[-1] == c.finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert idle(served[0])


def test_n_past_the_queue_is_refused_whole(client, served):
    eng = served[0]
    before = eng.stats["generated_tokens"]
    with pytest.raises(openai.RateLimitError, match="too many requests in flight"):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=600,
                                  n=eng.max_in_flight + 1, extra_body={"ignore_eos": True})
    wait_until(lambda: idle(eng))
    # The choices queued before the refusal were aborted, not run to their end.
    assert eng.stats["generated_tokens"] - before < 600


def test_client_disconnect_aborts_every_choice(client, served):
    eng = served[0]
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=600, n=2,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 6:
            break
    assert eng.stats["running"] == 2
    stream.close()
    wait_until(lambda: idle(eng))


@pytest.mark.parametrize("kwargs,param,match", [
    (dict(temperature=-1), "temperature", "temperature must be >= 0"),
    (dict(top_p=0), "top_p", r"top_p must be in \(0, 1\]"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be an integer >= 1"),
    (dict(seed=-3), "seed", "seed must be an integer"),
    (dict(n=0), "n", r"n must be an integer in \[1, 128\]"),
    (dict(n=129), "n", r"n must be an integer in \[1, 128\]"),
    (dict(extra_body={"n": 1.5}), "n", "n must be an integer"),
    (dict(presence_penalty=0.5), "presence_penalty", "repetition_penalty"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (dict(extra_body={"top_k": 1.5}), "top_k", "top_k must be an integer"),
    (dict(extra_body={"min_tokens": 9, "max_tokens": 3}), "min_tokens", "max_tokens=3"),
    (dict(extra_body={"tempreature": 0.5}), "tempreature", "Extra inputs"),
    (dict(extra_body={"stop_token_ids": [-1]}), "stop_token_ids", "stop_token_ids must be"),
    (dict(extra_body={"stop_token_ids": [10 ** 6]}), None, "vocabulary"),
    (dict(extra_body={"prompt_lookup_num_tokens": -2}), "prompt_lookup_num_tokens",
     "prompt_lookup_num_tokens must be an integer >= 0"),
    (dict(extra_body={"num_speculative_tokens": 2, "repetition_penalty": 1.2}),
     "num_speculative_tokens", "cannot be combined with repetition_penalty"),
    (dict(extra_body={"num_speculative_tokens": 2}), None, "needs a draft model"),
])
def test_bad_fields_get_openai_style_400(client, served, kwargs, param, match):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        client.completions.create(model=NAME, prompt=PROMPT, **{"max_tokens": 4, **kwargs})
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert idle(served[0])


def test_prompt_longer_than_the_context_is_400(client, served):
    ids = [5] * (served[0].engine.max_model_len + 1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt=ids, max_tokens=1)


def test_api_key_is_required_when_set(served, model_and_tokenizer):
    app = build_app(served[0], model_and_tokenizer[1], model_name=NAME, api_key="sesame")
    with running(app) as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices
        assert requests.get(url + "/health").status_code == 200  # open without the key


def long_stream(client):
    return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=600, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})


def test_client_disconnect_mid_stream_aborts_the_request(client, served):
    eng = served[0]
    before = eng.stats["generated_tokens"]
    stream = long_stream(client)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert eng.stats["running"] == 1
    stream.close()  # the client goes away
    wait_until(lambda: idle(eng))
    assert eng.stats["generated_tokens"] - before < 600


def test_full_queue_gets_429(client, served):
    eng = served[0]
    # create() returns once the response headers came, i.e. once the request was admitted
    streams = [long_stream(client) for _ in range(eng.max_in_flight)]
    try:
        with pytest.raises(openai.RateLimitError, match="too many requests in flight"):
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2)
    finally:
        for s in streams:
            s.close()
    wait_until(lambda: idle(eng))


def test_serve_command_starts_a_server_and_stops_on_ctrl_c():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root),
                                                       os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastdecode.cli", "serve", "--port",
                             str(port), "--num-blocks", "64", "--max-num-seqs", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                return requests.get(url + "/health", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(healthy, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["fastdecode-default"]
        assert client.completions.create(model="x", prompt=PROMPT, max_tokens=4).choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize("argv,message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
    (["--request-timeout", "-1"], "--request-timeout must be > 0"),
    (["--replicas", "2", "--tensor-parallel-size", "2"], "cannot be combined"),
])
def test_serve_command_refuses_bad_options(argv, message):
    from fastdecode.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["serve", *argv])


def test_client_disconnect_aborts_a_non_streaming_request(served):
    eng = served[0]
    before = eng.stats["generated_tokens"]
    body = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    with pytest.raises(requests.Timeout):  # the client gives up and closes its connection
        requests.post(served[1] + "/v1/completions", json=body, timeout=0.5)
    wait_until(lambda: idle(eng))
    assert eng.stats["generated_tokens"] - before < 900
