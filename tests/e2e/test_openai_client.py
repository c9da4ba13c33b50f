"""The official OpenAI Python client, through the router, against simulated vLLM engines."""

import openai
import pytest
from openai import OpenAI


@pytest.fixture
def client(fleet):
    return OpenAI(base_url=fleet["router"] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_are_merged(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["sim-llama"]


def test_chat_non_streaming(client):
    r = client.chat.completions.create(
        model="sim-llama",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="sim-llama",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        extra_headers={"x-request-priority": "1", "x-sla-target-ms": "500"},
    )
    text, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(text) == 12
    assert usage.completion_tokens == 12
    assert finish == "length"


def test_completions_both_ways(client):
    r = client.completions.create(model="sim-llama", prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model="sim-llama", prompt="Once upon a time", max_tokens=5, stream=True, extra_body={"ignore_eos": True}) if c.choices]
    assert len(pieces) == 5


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "sim-llama" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-request-priority": "9"})
    assert "x-request-priority" in str(e.value)


def test_router_headers_visible_to_the_client(client, fleet):
    raw = client.chat.completions.with_raw_response.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-qoe-endpoint"] in fleet["engines"]
    assert raw.headers["x-qoe-reason"] == "least-loaded"
    assert raw.headers["x-request-id"]


def test_http2_with_prior_knowledge(fleet):
    """A client that speaks only HTTP/2 in cleartext (as a service mesh's sidecar may)."""
    import httpx

    versions = []
    hooks = {"response": [lambda response: versions.append(response.http_version)]}
    with httpx.Client(http1=False, http2=True, event_hooks=hooks) as http:
        client = OpenAI(base_url=fleet["router"] + "/v1", api_key="unused", max_retries=0, http_client=http)
        assert [m.id for m in client.models.list().data] == ["sim-llama"]
        stream = client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "Count"}], max_tokens=8,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        for chunk in stream:
            usage = chunk.usage or usage
        assert usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="sim-llama", messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-request-priority": "7"})
        assert "x-request-priority" in refused.value.message
    assert versions == ["HTTP/2"] * 3


def test_http2_streams_finish_through_a_graceful_shutdown():
    """SIGTERM while an HTTP/2 client streams: the stream finishes whole (httpx's h2 takes the PING
    hyper sends after a GOAWAY for a protocol error, so the router does not send them), and an
    idle pooled HTTP/2 connection does not hold the shutdown for its timeout (20 s here)."""
    import signal
    import subprocess
    import time

    import httpx

    from conftest import BIN, free_port, stop, wait_ready

    engine_port, port = free_port(), free_port()
    procs = [subprocess.Popen(
        [BIN, "engine", "--port", str(engine_port), "--model", "sim-llama", "--profile", "tiny", "--speed", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_ready(f"http://127.0.0.1:{engine_port}/health")
        router = subprocess.Popen(
            [BIN, "serve", "--port", str(port), "--static-backends", f"http://127.0.0.1:{engine_port}",
             "--shutdown-timeout-ms", "20000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(router)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/ready")
        with httpx.Client(http1=False, http2=True) as idle, httpx.Client(http1=False, http2=True) as http:
            assert idle.get(base + "/v1/models").http_version == "HTTP/2"
            client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, http_client=http)
            stream = client.completions.create(
                model="sim-llama", prompt="Once upon a time", max_tokens=300, stream=True,
                extra_body={"ignore_eos": True})
            pieces = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if pieces == 0:
                        router.send_signal(signal.SIGTERM)
                        signalled = time.time()
                    pieces += 1
            assert pieces == 300
            router.wait(timeout=15)
            assert router.returncode == 0
            # The stream's end, not the shutdown timeout, let it exit.
            assert time.time() - signalled < 15
    finally:
        stop(procs)
