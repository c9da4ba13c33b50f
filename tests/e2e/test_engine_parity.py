"""Opt-in: the simulated engine against a REAL vLLM, request for request (see docs/REAL-VLLM.md).

Runs only when REAL_VLLM_URL points at a running vLLM 0.32 on 127.0.0.1 serving `tiny-llama` with
max_model_len 512 (../shared/real-vllm/serve.sh 8100, then REAL_VLLM_URL=http://127.0.0.1:8100).
Starts a simulated engine with the same name and context, sends both the same requests, and
compares what a client sees: statuses, error shapes, key sets and types, SSE framing, usage.
Generated text differs by nature and is not compared.
"""

import http.client
import json
import os
import subprocess
import urllib.parse

import pytest

from conftest import BIN, free_port, wait_ready

REAL = os.environ.get("REAL_VLLM_URL")
pytestmark = pytest.mark.skipif(not REAL, reason="set REAL_VLLM_URL to a running vLLM server")

MODEL = "tiny-llama"
MAX_LEN = 512
TIMEOUT = 60
MSGS = [{"role": "user", "content": "Hello"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.fixture(scope="module")
def urls():
    real = urllib.parse.urlsplit(REAL)
    assert real.hostname == "127.0.0.1", "REAL_VLLM_URL must be a 127.0.0.1 address"
    wait_ready(REAL + "/health", timeout=TIMEOUT)
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "engine", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
         "--profile", "tiny", "--max-model-len", str(MAX_LEN), "--speed", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sim = f"http://127.0.0.1:{port}"
        wait_ready(sim + "/health")
        yield {"real": REAL.rstrip("/"), "sim": sim}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def call(base, method, path, body=None, raw=None, content_type="application/json"):
    """One request; returns (status, lower-cased headers, body bytes)."""
    u = urllib.parse.urlsplit(base)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    headers = {"content-type": content_type} if content_type else {}
    try:
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def both(urls, method, path, body=None, **kw):
    return call(urls["real"], method, path, body, **kw), call(urls["sim"], method, path, body, **kw)


def shape(v, key=None):
    """Key sets and value types, recursively (a list by its first element)."""
    if isinstance(v, dict):
        if key == "top_logprobs" and set(v) != {"token", "logprob", "bytes"}:
            return "token->logprob"  # a completion's, keyed by token text
        return {k: shape(x, k) for k, x in v.items()}
    if key == "bytes" and isinstance(v, list):
        return "bytes"  # a token whose text vLLM holds back has none: [] is still bytes
    if isinstance(v, list):
        return [shape(v[0], key)] if v else []
    if isinstance(v, bool) or v is None:
        return type(v).__name__
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def media(headers):
    return headers.get("content-type", "").split(";")[0].strip()


def events(raw):
    """SSE events of a body, checking vLLM's framing: `data: ...` events ended by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-80:]
    out = []
    for ev in text[:-2].split("\n\n"):
        assert ev.startswith("data: ") and "\n" not in ev, ev
        out.append(ev[len("data: "):])
    assert out[-1] == "[DONE]"
    return [json.loads(e) for e in out[:-1]]


def chunk_shapes(chunks):
    """The distinct chunk shapes with the finish reasons seen, in a comparable form."""
    return sorted({json.dumps(shape(c), sort_keys=True) for c in chunks})


def test_plain_routes_match(urls):
    for path in ["/health", "/v1/models", "/version", "/load"]:
        (rs, rh, rb), (ss, sh, sb) = both(urls, "GET", path)
        assert rs == ss == 200, path
        assert media(rh) == media(sh), path
        if rb:
            assert shape(json.loads(rb)) == shape(json.loads(sb)), path
    (_, _, rb), (_, _, sb) = both(urls, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(sb)["data"]] == [MODEL]
    assert json.loads(sb)["data"][0]["max_model_len"] == json.loads(rb)["data"][0]["max_model_len"]
    (rs, _, _), (ss, _, _) = both(urls, "POST", "/v1/embeddings", {"model": MODEL, "input": "hi"})
    assert rs == ss


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 3, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 2, "n": 2, "logprobs": 2}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 2, "echo": True}),
    ("/v1/completions", {"prompt": ["a b", "c d"], "max_tokens": 2, "stop": ["\n"], "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": MSGS, "max_completion_tokens": 3, "ignore_eos": True}),
    # ignore_eos: a random-weight model's early EOS would change the logprobs' shape.
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "n": 2, "logprobs": True, "top_logprobs": 2,
                              "ignore_eos": True}),
])
def test_answers_have_the_same_shape(urls, path, body):
    body = {"model": MODEL, **body}
    (rs, rh, rb), (ss, sh, sb) = both(urls, "POST", path, body)
    assert rs == ss == 200, (rb, sb)
    assert media(rh) == media(sh) == "application/json"
    real, sim = json.loads(rb), json.loads(sb)
    assert shape(sim) == shape(real)
    assert len(sim["choices"]) == len(real["choices"])
    assert [c["index"] for c in sim["choices"]] == [c["index"] for c in real["choices"]]
    if body.get("ignore_eos"):
        assert sim["usage"]["completion_tokens"] == real["usage"]["completion_tokens"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 3}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 2, "n": 2,
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 2, "logprobs": 1,
                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 3}),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "n": 2,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "logprobs": True, "top_logprobs": 1,
                              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
])
def test_streams_have_the_same_framing_and_chunks(urls, path, body):
    body = {"model": MODEL, "stream": True, "ignore_eos": True, **body}
    (rs, rh, rb), (ss, sh, sb) = both(urls, "POST", path, body)
    assert rs == ss == 200
    assert rh["content-type"] == sh["content-type"] == "text/event-stream; charset=utf-8"
    real, sim = events(rb), events(sb)
    assert chunk_shapes(sim) == chunk_shapes(real)
    usage = body.get("stream_options", {}).get("include_usage")
    for chunks in (real, sim):
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert sorted(f for f in finishes if f) == ["length"] * body.get("n", 1)
        # The usage chunk, when asked for, is the last one, with no choices and the totals.
        last = chunks[-1]
        assert (last["choices"] == [] and "usage" in last) == bool(usage)
        assert "system_fingerprint" in last
    if usage:
        assert sim[-1]["usage"]["completion_tokens"] == real[-1]["usage"]["completion_tokens"]
        assert set(sim[-1]["usage"]) == set(real[-1]["usage"])


# (name, method, path, body, raw body, content type)
ERRORS = [
    ("invalid JSON", "POST", "/v1/completions", None, "{not json", "application/json"),
    ("body not an object", "POST", "/v1/chat/completions", None, "[1,2]", "application/json"),
    ("not JSON content", "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, None,
     "application/x-www-form-urlencoded"),
    ("missing messages", "POST", "/v1/chat/completions", {"model": MODEL}, None, "application/json"),
    ("missing prompt", "POST", "/v1/completions", {"model": MODEL}, None, "application/json"),
    ("unknown model", "POST", "/v1/completions", {"model": "nope", "prompt": "x"}, None, "application/json"),
    ("unknown model, chat", "POST", "/v1/chat/completions", {"model": "nope", "messages": MSGS}, None,
     "application/json"),
    ("max_tokens not a number", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"},
     None, "application/json"),
    ("max_tokens fractional", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2.5},
     None, "application/json"),
    ("negative max_tokens", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1},
     None, "application/json"),
    ("max_tokens above the context", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "x", "max_tokens": 10_000}, None, "application/json"),
    ("prompt longer than the context", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "hello world " * 600, "max_tokens": 4}, None, "application/json"),
    ("prompt longer than the context, chat", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hello world " * 600}]}, None,
     "application/json"),
    ("stream_options without stream", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, None, "application/json"),
    ("n of 0", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, None, "application/json"),
    ("too many logprobs", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50},
     None, "application/json"),
    ("empty conversation", "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, None,
     "application/json"),
    ("presence_penalty out of range", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, None, "application/json"),
    ("frequency_penalty out of range", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "x", "frequency_penalty": -9}, None, "application/json"),
    ("repetition_penalty of 0", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, None, "application/json"),
    ("top_k below -1", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -5}, None,
     "application/json"),
    ("min_p above 1", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "min_p": 2}, None,
     "application/json"),
    ("negative min_tokens", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": -1},
     None, "application/json"),
    ("min_tokens above max_tokens", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "x", "min_tokens": 5, "max_tokens": 3}, None, "application/json"),
    ("empty token-id prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": [[]]}, None,
     "application/json"),
    ("empty tools", "POST", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "tools": []}, None,
     "application/json"),
    ("tool_choice without tools", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": MSGS, "tool_choice": "required"}, None, "application/json"),
    ("tool_choice of no kind", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": MSGS, "tools": [TOOL], "tool_choice": "bogus"}, None, "application/json"),
    ("a named tool not among tools", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": MSGS, "tools": [TOOL],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None, "application/json"),
    ("tools, auto without a tool parser", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": MSGS, "tools": [TOOL]}, None, "application/json"),
    ("tools, required without a tool parser", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": MSGS, "tools": [TOOL], "tool_choice": "required"}, None,
     "application/json"),
    ("a named tool without a tool parser", "POST", "/v1/chat/completions",
     {"model": MODEL, "messages": MSGS, "tools": [TOOL],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, None, "application/json"),
    ("tokenize, unknown model", "POST", "/tokenize", {"model": "nope", "prompt": "x"}, None, "application/json"),
    ("detokenize, not a list", "POST", "/detokenize", {"tokens": "x"}, None, "application/json"),
]


@pytest.mark.parametrize("name,method,path,body,raw,ctype", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_have_the_same_status_and_shape(urls, name, method, path, body, raw, ctype):
    (rs, rh, rb), (ss, sh, sb) = both(urls, method, path, body, raw=raw, content_type=ctype)
    assert rs == ss and rs >= 400, (rb, sb)
    assert media(rh) == media(sh) == "application/json"
    real, sim = json.loads(rb)["error"], json.loads(sb)["error"]
    assert set(sim) == set(real) == {"message", "type", "param", "code"}
    assert (sim["type"], sim["param"], sim["code"]) == (real["type"], real["param"], real["code"])


def test_a_body_of_megabytes_is_read_and_refused_for_its_length(urls):
    """No body cap below vLLM's (none): a 3 MiB prompt is refused for the context it overflows.
    vLLM counts its characters first, against the tokenizer's longest token (a bound the simulated
    engine, which has no vocabulary, does not know), so the two name different params."""
    body = {"model": MODEL, "prompt": "y" * (3 << 20), "max_tokens": 4}
    (rs, _, rb), (ss, _, sb) = both(urls, "POST", "/v1/completions", body)
    assert rs == ss == 400, (rb[:300], sb[:300])
    assert json.loads(rb)["error"]["param"] == "input_text"
    assert json.loads(sb)["error"]["param"] == "input_tokens"


@pytest.mark.parametrize("method,path", [("GET", "/v1/nope"), ("POST", "/v1/nope"),
                                         ("GET", "/v1/completions"), ("POST", "/v1/models"),
                                         ("POST", "/health"), ("HEAD", "/health")])
def test_unknown_routes_and_wrong_methods(urls, method, path):
    (rs, rh, rb), (ss, sh, sb) = both(urls, method, path, {} if method == "POST" else None)
    assert rs == ss and rs in (404, 405)
    if method != "HEAD":
        assert json.loads(sb) == json.loads(rb)
    assert media(sh) == media(rh) == "application/json"
    assert ("allow" in sh) == ("allow" in rh)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 1}),  # no model: the served one
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "2"}),  # lax integer
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "priority": 1}),  # ignored
    ("/v1/chat/completions", {"model": "", "messages": MSGS, "max_tokens": 1, "stream": "false"}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "top_k": -1, "min_p": 1,
                         "presence_penalty": 2, "frequency_penalty": -2, "repetition_penalty": 1.1,
                         "min_tokens": 2}),  # vLLM's bounds, inclusive where it is
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 1, "tools": [TOOL],
                              "tool_choice": "none"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 1, "tool_choice": "none"}),
])
def test_requests_vllm_accepts_are_accepted(urls, path, body):
    (rs, _, rb), (ss, _, sb) = both(urls, "POST", path, body)
    assert rs == ss == 200, (rb, sb)
    assert json.loads(sb)["model"] == json.loads(rb)["model"] == MODEL


def test_max_tokens_is_capped_to_what_fits(urls):
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 510, "ignore_eos": True}
    (rs, _, rb), (ss, _, sb) = both(urls, "POST", "/v1/completions", body)
    assert rs == ss == 200
    assert json.loads(rb)["usage"]["total_tokens"] == json.loads(sb)["usage"]["total_tokens"] == MAX_LEN
    # A completion without max_tokens gets 16.
    body = {"model": MODEL, "prompt": "Hello there", "ignore_eos": True}
    (_, _, rb), (_, _, sb) = both(urls, "POST", "/v1/completions", body)
    assert json.loads(rb)["usage"]["completion_tokens"] == json.loads(sb)["usage"]["completion_tokens"] == 16


def test_tokenize_and_detokenize_have_the_same_shape(urls):
    for path, body in [("/tokenize", {"model": MODEL, "prompt": "Hello there"}),
                       ("/tokenize", {"messages": MSGS, "return_token_strs": True}),
                       ("/detokenize", {"model": MODEL, "tokens": [5, 6, 7]})]:
        (rs, _, rb), (ss, _, sb) = both(urls, "POST", path, body)
        assert rs == ss == 200, path
        assert shape(json.loads(sb)) == shape(json.loads(rb)), path


def test_metrics_names_are_vllms(urls):
    def names(raw):
        return {line.split("{")[0].split(" ")[0] for line in raw.decode().splitlines()
                if line.startswith("vllm:")}
    (rs, rh, rb), (ss, sh, sb) = both(urls, "GET", "/metrics")
    assert rs == ss == 200
    assert media(sh) == media(rh) == "text/plain"
    real, sim = names(rb), names(sb)
    assert sim <= real, sim - real
    for n in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
              "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count"]:
        assert n in sim, n


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "once upon a time", "seed": 42, "temperature": 1.0,
                         "ignore_eos": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "seed": 7, "temperature": 0.8,
                              "ignore_eos": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 0, "ignore_eos": True}),
])
def test_reproducible_sampling_cuts_the_same_text_whatever_max_tokens_and_stop_say(urls, path, body):
    def text(base, **extra):
        status, _, raw = call(base, "POST", path, {**body, **extra})
        assert status == 200, raw
        choice = json.loads(raw)["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    for base in (urls["real"], urls["sim"]):
        short, long = text(base, max_tokens=8), text(base, max_tokens=20)
        assert long.startswith(short) and long != short, (base, short, long)
        assert text(base, max_tokens=20, stop=["zzz-never-seen"]) == long, base


def test_the_answer_is_named_after_the_clients_request_id(urls):
    for base in (urls["real"], urls["sim"]):
        u = urllib.parse.urlsplit(base)
        for path, body, prefix in [
            ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 2}, "chatcmpl-"),
            ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, "cmpl-"),
        ]:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
            try:
                c.request("POST", path, body=json.dumps(body),
                          headers={"content-type": "application/json", "x-request-id": "trace-42"})
                r = c.getresponse()
                assert r.status == 200
                assert json.loads(r.read())["id"] == prefix + "trace-42", base
            finally:
                c.close()
