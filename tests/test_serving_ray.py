"""Ray Serve: a local Ray instance with 2 fastdecode replicas behind Ray Serve's router serves
correct completions through the OpenAI routes."""

from __future__ import annotations

import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from fastdecode import Engine, SamplingParams
from fastdecode.hf.frontend import load as load_checkpoint
from serving_helpers import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["Return the", "The value of", "Raise an exception if", "Create a new"]


@pytest.fixture(scope="module")
def ray_serve():
    port = free_port()
    # Replicas import this checkout's fastdecode, with one thread each (2-core machines).
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_correct_completions_through_the_router(ray_serve):
    from fastdecode.serving.ray import deployment

    serve.run(deployment(None, num_replicas=2, num_blocks=64, served_model_name="tiny",
                         ray_actor_options={"num_cpus": 1}),
              name="fastdecode", route_prefix="/")
    status = serve.status().applications["fastdecode"].deployments["fastdecode"]
    assert status.replica_states.get("RUNNING") == 2

    model, tok = load_checkpoint(None, "cpu", torch.float32)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    refs = Engine(model, num_blocks=64).generate([tok(p)["input_ids"] for p in PROMPTS], params)
    expected = [tok.decode(r.output_ids, skip_special_tokens=True) for r in refs]

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ray_serve}/v1", api_key="unused",
                           max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    def complete(prompt: str) -> str:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                      temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:  # concurrent: the router spreads them over replicas
        got = list(pool.map(complete, PROMPTS * 2))
    assert got == expected * 2
    chunks = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected[0]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
