"""The router's and the simulated engines' /metrics, read by the Prometheus project's own Python
parsers (prometheus_client): the formats a Prometheus server scrapes."""

import urllib.request

from openai import OpenAI
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic

# What Prometheus 3 sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,"
    "application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.3"
)


def scrape(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def test_router_metrics_parse_as_typed_openmetrics(fleet):
    client = OpenAI(base_url=fleet["router"] + "/v1", api_key="unused", max_retries=0, timeout=30)
    client.completions.create(model="sim-llama", prompt="scrape me", max_tokens=3, stream=True)
    kind, text = scrape(fleet["router"] + "/metrics", PROMETHEUS_ACCEPT)
    assert kind.startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics(text)}
    assert families["qoe_router_requests"].type == "counter"
    served = sum(s.value for s in families["qoe_router_requests"].samples if s.name.endswith("_total"))
    assert served >= 1
    assert families["qoe_router_time_to_first_token_seconds"].type == "histogram"
    assert families["qoe_router_ttft_seconds"].type == "gauge"
    # Without an Accept header (curl, a browser) the same text is labelled classic and parses so.
    kind, text = scrape(fleet["router"] + "/metrics")
    assert kind.startswith("text/plain; version=0.0.4")
    assert any(f.name.startswith("qoe_router_") for f in classic(text))


def test_engine_metrics_parse_as_vllm_names(fleet):
    for engine in fleet["engines"]:
        _, text = scrape(engine + "/metrics", PROMETHEUS_ACCEPT)
        families = {f.name: f for f in classic(text)}
        assert families["vllm:num_requests_running"].type == "gauge"
        assert families["vllm:time_to_first_token_seconds"].type == "histogram"
