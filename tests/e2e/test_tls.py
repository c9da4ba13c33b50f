"""The OpenAI client over https: the router serving TLS on its own port (--tls-cert-file,
--tls-key-file) in front of a simulated engine. The CA and the router's certificate are made
with the openssl command for this run.
"""

import shutil
import ssl
import subprocess
import time
import urllib.request

import httpx
import pytest
from openai import OpenAI

from conftest import BIN, free_port, stop, wait_ready

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "router.key", "-out", "router.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "router.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "router.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


@pytest.fixture(scope="module")
def https_router(pki):
    procs = []
    try:
        engine_port, port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [BIN, "engine", "--port", str(engine_port), "--model", "sim-llama", "--profile", "tiny", "--speed", "4"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"http://127.0.0.1:{engine_port}/health")
        procs.append(subprocess.Popen(
            [BIN, "serve", "--port", str(port), "--static-backends", f"http://127.0.0.1:{engine_port}",
             "--tls-cert-file", str(pki / "router.pem"), "--tls-key-file", str(pki / "router.key")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"https://127.0.0.1:{port}"
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=1, context=context) as r:
                    if b"sim-llama" in r.read():
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the router never listed the model over https"
            time.sleep(0.05)
        yield url
    finally:
        stop(procs)


def test_chat_and_completions_over_https(https_router, pki):
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki / "ca.pem"))) as http:
        client = OpenAI(base_url=https_router + "/v1", api_key="unused", max_retries=0, http_client=http)
        assert [m.id for m in client.models.list().data] == ["sim-llama"]
        stream = client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
            stream=True, stream_options={"include_usage": True})
        usage = None
        for chunk in stream:
            usage = chunk.usage or usage
        assert usage.completion_tokens == 12
        answer = client.completions.create(model="sim-llama", prompt="Hi", max_tokens=5)
        assert answer.usage.completion_tokens == 5


def test_a_client_without_the_ca_is_refused(https_router):
    with httpx.Client() as http:  # the system's roots only
        client = OpenAI(base_url=https_router + "/v1", api_key="unused", max_retries=0, http_client=http)
        with pytest.raises(Exception) as refused:
            client.models.list()
        assert "CERTIFICATE_VERIFY_FAILED" in repr(refused.value.__cause__ or refused.value)


def test_http2_by_alpn(https_router, pki):
    versions = []
    hooks = {"response": [lambda response: versions.append(response.http_version)]}
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with httpx.Client(verify=context, http2=True, event_hooks=hooks) as http:
        client = OpenAI(base_url=https_router + "/v1", api_key="unused", max_retries=0, http_client=http)
        stream = client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
            stream=True, extra_body={"ignore_eos": True})
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) == 6
    assert versions == ["HTTP/2"]
