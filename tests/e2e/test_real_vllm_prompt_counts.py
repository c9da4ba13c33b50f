"""Opt-in: `--tokenizer` counts a chat's prompt as a REAL vLLM engine does (docs/REAL-VLLM.md).

Runs when REAL_VLLM_URL points at a running vLLM server and QOE_TOKENIZER_JSON at the served
model's tokenizer.json, with QOE_ROUTER_BIN a router built with `--features tokenizer`. If the
engine was started with its own `--chat-template FILE`, set REAL_VLLM_CHAT_TEMPLATE=FILE: the
router is given the same template. fixtures/tools-chat-template.jinja renders tools and tool calls
(as Qwen's templates do), so that their rendering is checked too.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import BIN, free_port, wait_ready

REAL = os.environ.get("REAL_VLLM_URL")
TOKENIZER = os.environ.get("QOE_TOKENIZER_JSON")
TEMPLATE = os.environ.get("REAL_VLLM_CHAT_TEMPLATE")
pytestmark = pytest.mark.skipif(
    not (REAL and TOKENIZER), reason="set REAL_VLLM_URL and QOE_TOKENIZER_JSON")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    "name": "search", "strict": True}}

CHATS = {
    "tools": {"messages": [{"role": "user", "content": "What's the weather in Paris?"}],
              "tools": [WEATHER, SEARCH], "tool_choice": "none"},
    "tools and a system prompt": {
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Weather in Oslo and Rome?"}],
        "tools": [WEATHER], "tool_choice": "none"},
    "tool calls and results": {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}},
                {"id": "c2", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "name": "get_weather",
             "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
            {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "rain"}],
        "tools": [WEATHER], "tool_choice": "none"},
    "unicode and markup in a tool": {
        "messages": [{"role": "user", "content": "Météo à Zürich ? 天気"}],
        "tools": [{"type": "function", "function": {
            "name": "météo", "description": "Prévisions — «officielles» <b>&</b>",
            "parameters": {"type": "object", "properties": {"ville": {"type": "string"}}}}}],
        "tool_choice": "none"},
    "chat_template_kwargs": {"messages": [{"role": "user", "content": "Hello there"}],
                             "chat_template_kwargs": {"greeting": "Greetings, from the kwargs"}},
    "no generation prompt": {"messages": [{"role": "user", "content": "Hello, how are you?"}],
                             "add_generation_prompt": False},
    "a final message continued": {
        "messages": [{"role": "user", "content": "Write a haiku"},
                     {"role": "assistant", "content": "Autumn moonlight, "}],
        "add_generation_prompt": False, "continue_final_message": True},
    "tools null, an empty tool_calls, reasoning": {
        "messages": [
            {"role": "user", "content": "Think first."},
            {"role": "assistant", "content": "Done.", "reasoning": "Let me think it over.",
             "tool_calls": []},
            {"role": "assistant", "content": "Again.", "reasoning_content": "read when there is no reasoning",
             "tool_calls": None},
            {"role": "user", "content": "Thanks"}],
        "tools": None},
    "arguments that are not JSON": {
        "messages": [
            {"role": "user", "content": "Call it"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "a", "type": "function",
                 "function": {"name": "get_weather", "arguments": "city=Paris"}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "  "}}]}],
        "tools": [WEATHER], "tool_choice": "none"},
    "settings as strings and in the kwargs": {
        "messages": [{"role": "user", "content": "Go on"},
                     {"role": "assistant", "content": "Once upon a time "}],
        "add_generation_prompt": "no",
        "chat_template_kwargs": {"continue_final_message": True}},
    "named user, text parts": {"messages": [{"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]}]},
}


@pytest.fixture(scope="module")
def router():
    model_dir = tempfile.mkdtemp(prefix="qoe-tokenizer-")
    source = os.path.dirname(TOKENIZER)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), model_dir)
    if TEMPLATE:
        shutil.copy(TEMPLATE, os.path.join(model_dir, "chat_template.jinja"))
    log = tempfile.NamedTemporaryFile(prefix="qoe-router-", suffix=".log", delete=False)
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "serve", "--port", str(port), "--static-backends", REAL, "--log-format", "json",
         "--tokenizer", os.path.join(model_dir, "tokenizer.json")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/v1/models")
        yield url, log.name
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.unlink(log.name)


def router_count(log_path, request_id):
    """The prompt tokens the router's request log line gives for `request_id`."""
    for _ in range(50):
        with open(log_path) as f:
            for line in f:
                if request_id in line and '"message":"request"' in line:
                    return json.loads(line)["prompt_tokens"]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


@pytest.mark.parametrize("case", list(CHATS))
def test_a_chat_is_counted_as_vllm_counts_it(router, case):
    url, log_path = router
    body = dict(CHATS[case], model="tiny-llama", max_tokens=1)
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        request_id = r.headers["x-request-id"]
        usage = json.load(r)["usage"]
    assert router_count(log_path, request_id) == usage["prompt_tokens"]
