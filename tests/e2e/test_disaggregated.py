"""The official OpenAI Python client through a router that splits each request in a prefill and a
decode stage, in front of simulated engines started with `--role prefill` and `--role decode`
(which refuse the other stage's requests, as vLLM's KV connector does)."""

import json
import subprocess
import tempfile
import urllib.request

import pytest
from openai import OpenAI

from conftest import BIN, free_port, stop, wait_ready

MODEL = "sim-llama"


@pytest.fixture(scope="module")
def split_fleet():
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            engines = {}
            for role in ("prefill", "decode"):
                port = free_port()
                procs.append(subprocess.Popen(
                    [BIN, "engine", "--port", str(port), "--model", MODEL, "--profile", "tiny", "--role", role],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                engines[role] = f"http://127.0.0.1:{port}"
            for url in engines.values():
                wait_ready(url + "/health")
            config = f"{tmp}/router.toml"
            with open(config, "w") as f:
                f.write('routing_logic = "qoe"\n')
                for role, url in engines.items():
                    f.write(f'[[backends]]\nurl = "{url}"\nmodels = ["{MODEL}"]\nrole = "{role}"\n')
            port = free_port()
            procs.append(subprocess.Popen(
                [BIN, "serve", "--port", str(port), "--config", config],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            router = f"http://127.0.0.1:{port}"
            wait_ready(router + "/ready")
            yield {"router": router, **engines}
        finally:
            stop(procs)


@pytest.fixture
def client(split_fleet):
    return OpenAI(base_url=split_fleet["router"] + "/v1", api_key="unused", max_retries=0, timeout=30)


def submitted(url):
    with urllib.request.urlopen(url + "/admin/stats", timeout=5) as r:
        return json.load(r)["submitted"]


def test_streamed_chat_is_prefilled_and_decoded_on_their_engines(client, split_fleet):
    before = {role: submitted(split_fleet[role]) for role in ("prefill", "decode")}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert raw.headers["x-qoe-prefill-endpoint"] == split_fleet["prefill"]
    assert raw.headers["x-qoe-endpoint"] == split_fleet["decode"]
    text, usage = [], None
    for chunk in raw.parse():
        usage = chunk.usage or usage
        text += [c.delta.content for c in chunk.choices if c.delta.content]
    # The client gets the whole answer, not the prefill stage's one token.
    assert len(text) == 9 and usage.completion_tokens == 9
    after = {role: submitted(split_fleet[role]) for role in ("prefill", "decode")}
    assert {role: after[role] - before[role] for role in after} == {"prefill": 1, "decode": 1}


def test_completions_and_chat_unstreamed_come_back_whole(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].message.content
