"""Opt-in: the router in front of a REAL vLLM engine (see docs/REAL-VLLM.md).

Runs only when REAL_VLLM_URL points at a running vLLM server, e.g. one started with
../shared/real-vllm/serve.sh 8100 (then REAL_VLLM_URL=http://127.0.0.1:8100). For an engine
served over https (vLLM's --ssl-certfile), REAL_VLLM_CA_FILE names the PEM file of the CA that
signed its certificate; the router gets it as --upstream-ca-file. For one that requires client
certificates (--ssl-ca-certs, --ssl-cert-reqs 2), REAL_VLLM_CLIENT_CERT and REAL_VLLM_CLIENT_KEY
name the router's (--upstream-client-cert, --upstream-client-key).
"""

import json
import os
import ssl
import subprocess
import time
import urllib.request

import pytest
from openai import OpenAI

from conftest import BIN, free_port, wait_ready

REAL = os.environ.get("REAL_VLLM_URL")
CA_FILE = os.environ.get("REAL_VLLM_CA_FILE")
CLIENT_CERT = os.environ.get("REAL_VLLM_CLIENT_CERT")
CLIENT_KEY = os.environ.get("REAL_VLLM_CLIENT_KEY")
assert (CLIENT_CERT is None) == (
    CLIENT_KEY is None
), "set REAL_VLLM_CLIENT_CERT and REAL_VLLM_CLIENT_KEY together"
pytestmark = pytest.mark.skipif(not REAL, reason="set REAL_VLLM_URL to a running vLLM server")


@pytest.fixture(scope="module")
def router():
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "serve", "--port", str(port), "--static-backends", REAL, "--engine-stats-interval", "0.5"]
        + (["--upstream-ca-file", CA_FILE] if CA_FILE else [])
        + (["--upstream-client-cert", CLIENT_CERT, "--upstream-client-key", CLIENT_KEY] if CLIENT_CERT else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/health")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def engines(router):
    with urllib.request.urlopen(router + "/engines", timeout=5) as r:
        return json.load(r)["endpoints"]


def test_discovers_the_model(router):
    client = OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


def test_streams_chat_and_reads_v1_metrics(router):
    client = OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=16,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    pieces, usage = 0, None
    for chunk in stream:
        usage = chunk.usage or usage
        pieces += sum(1 for c in chunk.choices if c.delta.content)
    assert usage.completion_tokens == 16
    assert pieces >= 1
    deadline = time.time() + 10
    while time.time() < deadline:
        e = engines(router)[0]
        m = e["engine_metrics"] or {}
        if (m.get("generation_tokens") or 0) >= 16:
            break
        time.sleep(0.2)
    assert e["healthy"]
    assert m["running"] is not None and m["waiting"] is not None and m["kv_usage"] is not None
    assert m["prefix_queries"] is not None and m["ttft_count"] >= 1
    assert e["observed"]["ttft_ms"] > 0 and e["observed"]["itl_ms"] > 0


def output_tokens(router):
    """The router's count of streamed output tokens, summed over endpoints."""
    with urllib.request.urlopen(router + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("qoe_router_output_tokens_total"))


def counted(router, request):
    """Runs `request` and returns how many output tokens the router counted for it."""
    before = output_tokens(router)
    request()
    deadline = time.time() + 5
    while time.time() < deadline and output_tokens(router) == before:
        time.sleep(0.05)
    time.sleep(0.2)
    return output_tokens(router) - before


def test_counts_every_token_without_a_usage_report(router):
    # Greedy decoding: the same tokens twice, once with the usage report, once without. The
    # random-weight model emits many tokens whose text vLLM holds back (parts of characters):
    # they come as chunks with empty text and count all the same. vLLM sends one chunk per
    # token unless its output falls behind (a loaded machine), when it merges a held-back token
    # into the next chunk; without a usage report the router then counts chunks, a lower bound.
    client = OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model="tiny-llama", prompt="Hello world", max_tokens=24, temperature=0,
                  stream=True, extra_body={"ignore_eos": True})
    usage = None
    for chunk in client.completions.create(stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
    assert usage.completion_tokens == 24
    chunks = []
    n = counted(router, lambda: chunks.extend(client.completions.create(**kwargs)))
    assert n == len(chunks) <= 24
    chat = dict(model="tiny-llama", messages=[{"role": "user", "content": "Hi there"}],
                max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = []
    n = counted(router, lambda: chunks.extend(client.chat.completions.create(**chat)))
    # The first chat chunk carries the role and no token.
    assert n == len(chunks) - 1 <= 24


def test_counts_responses_api_stream_tokens(router):
    client = OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=60)
    events = []
    n = counted(router, lambda: events.extend(client.responses.create(
        model="tiny-llama", input="Hello", max_output_tokens=8, stream=True)))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage.output_tokens == n
    assert any(e.type == "response.output_text.delta" for e in events)


def status_of(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    tls = None
    if base.startswith("https:"):
        tls = ssl.create_default_context(cafile=CA_FILE)
        if CLIENT_CERT:
            tls.load_cert_chain(CLIENT_CERT, CLIENT_KEY)
    try:
        with urllib.request.urlopen(req, timeout=30, context=tls) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


ODD_REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"content": "x"}], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "2"}),
    ("/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3.0, "stream": "yes"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "input": 5}),
    ("/v1/completions", {"prompt": None, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "max_completion_tokens": "ten"}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "max_tokens": "ten"}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": "2"}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "system": "be brief"}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize("path,body", ODD_REQUESTS)
def test_the_router_refuses_only_what_vllm_refuses(router, path, body):
    for model in ("tiny-llama", "", None):
        sent = dict(body) if model is None else {"model": model, **body}
        assert status_of(router, path, sent) == status_of(REAL, path, sent), (model, sent)
