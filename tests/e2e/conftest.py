"""A local fleet for end-to-end tests: simulated engines and the router, on 127.0.0.1 only."""

import os
import socket
import subprocess
import time
import urllib.request

import pytest

BIN = os.environ.get("QOE_ROUTER_BIN", os.path.join(os.path.dirname(__file__), "../../target/debug/qoe-router"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {timeout}s")


def stop(procs) -> None:
    """Ends the processes a fixture started: SIGTERM, then SIGKILL for any still up after 10 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="session")
def fleet():
    procs = []
    try:
        engines = []
        for speed in ("4", "1"):
            port = free_port()
            procs.append(subprocess.Popen(
                [BIN, "engine", "--port", str(port), "--model", "sim-llama", "--profile", "tiny", "--speed", speed],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            engines.append(f"http://127.0.0.1:{port}")
        for e in engines:
            wait_ready(e + "/health")
        port = free_port()
        procs.append(subprocess.Popen(
            [BIN, "serve", "--port", str(port), "--static-backends", ",".join(engines), "--routing-logic", "least-loaded"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        router = f"http://127.0.0.1:{port}"
        wait_ready(router + "/health")
        # Models are detected from the engines at start.
        wait_ready(router + "/v1/models")
        yield {"router": router, "engines": engines}
    finally:
        stop(procs)
