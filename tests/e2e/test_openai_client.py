"""The official OpenAI Python client, through the router, against simulated vLLM engines."""

import time

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


def _router_over_one_engine(read_timeout_ms: int, speed: str):
    """An engine and a router in front, the router's client timeouts at `read_timeout_ms`."""
    import subprocess

    from conftest import BIN, free_port, wait_ready

    engine_port, port = free_port(), free_port()
    procs = [subprocess.Popen(
        [BIN, "engine", "--port", str(engine_port), "--model", "sim-llama", "--profile", "tiny", "--speed", speed],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    wait_ready(f"http://127.0.0.1:{engine_port}/health")
    procs.append(subprocess.Popen(
        [BIN, "serve", "--port", str(port), "--static-backends", f"http://127.0.0.1:{engine_port}",
         "--request-read-timeout-ms", str(read_timeout_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/ready")
    return procs, base, port


def test_http2_pings_leave_a_reading_client_streaming():
    """The router PINGs HTTP/2 clients (every half of --request-read-timeout-ms): httpx's h2
    answers them while it streams, and a stream far longer than the timeout arrives whole."""
    import httpx

    from conftest import stop

    procs, base, _ = _router_over_one_engine(400, "0.3")
    try:
        with httpx.Client(http1=False, http2=True) as http:
            client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, http_client=http)
            started = time.time()
            stream = client.completions.create(
                model="sim-llama", prompt="Once upon a time", max_tokens=400, stream=True,
                extra_body={"ignore_eos": True})
            pieces = sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text)
            assert pieces == 400
            assert time.time() - started > 1.0, "the stream outlasted several PING intervals"
    finally:
        stop(procs)


def test_an_http2_client_that_stops_reading_is_let_go():
    """An HTTP/2 client that stops reading its connection after a stream's headers: its flow
    window stops the router's writes before any socket write waits, but it answers no PING, so
    its connection is closed and the engine's request dropped (the load back to 0)."""
    import json
    import socket
    import urllib.request

    import h2.config
    import h2.connection
    import h2.events

    from conftest import stop

    procs, base, port = _router_over_one_engine(600, "1")
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        body = json.dumps({"model": "sim-llama", "prompt": "Once upon a time", "max_tokens": 3000,
                           "stream": True, "ignore_eos": True}).encode()
        conn.send_headers(1, [(":method", "POST"), (":path", "/v1/completions"), (":scheme", "http"),
                              (":authority", f"127.0.0.1:{port}"), ("content-type", "application/json"),
                              ("content-length", str(len(body)))])
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        got_headers = False
        while not got_headers:
            data = sock.recv(65536)
            assert data, "the router answered"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    assert dict(event.headers)[b":status"] == b"200", event.headers
                    got_headers = True
            sock.sendall(conn.data_to_send())

        def in_flight():
            with urllib.request.urlopen(base + "/engines", timeout=5) as r:
                load = json.load(r)["endpoints"][0]["load"]
            return load["in_prefill"] + load["in_decode"]

        assert in_flight() == 1
        # Nothing read from here on: no window update, no PING answered.
        deadline = time.time() + 15
        while in_flight() and time.time() < deadline:
            time.sleep(0.1)
        assert in_flight() == 0, "the stalled client's request was dropped"
        sock.close()
    finally:
        stop(procs)
