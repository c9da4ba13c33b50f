#!/usr/bin/env python3
"""Shape calibration of an OpenAI-compatible engine: TTFT against prompt length on an idle engine,
and inter-token latency against concurrency. Prints a Markdown table.

usage: .venv/bin/python scripts/calibrate.py URL MODEL [--max-prompt TOKENS]
"""

import argparse
import asyncio
import statistics
import time

from openai import AsyncOpenAI


async def one(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    first, last, n, prompt_tokens = None, None, 0, None
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage:
            prompt_tokens = chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].text:
            n += 1
            first = first or now
            last = now
    itl = (last - first) / (n - 1) if n > 1 else None
    return (first - t0) * 1e3, (itl * 1e3 if itl else None), prompt_tokens


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--max-prompt", type=int, default=400)
    a = ap.parse_args()
    client = AsyncOpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    await one(client, a.model, "warm up", 4)
    print("| prompt tokens | TTFT p50 ms (idle, 5 runs) |")
    print("|---|---|")
    for frac in (0.05, 0.25, 0.5, 0.75, 1.0):
        # About three tokens per word with a real tokenizer; the exact count is read from usage.
        body = " ".join(f"w{i % 97}" for i in range(max(1, int(a.max_prompt * frac / 3))))
        # A distinct first word per run, so no run hits the prefix cache of another.
        runs = [await one(client, a.model, f"r{run}x{frac} {body}", 2) for run in range(5)]
        print(f"| {runs[0][2]} | {statistics.median(r[0] for r in runs):.1f} |")
    print()
    print("| concurrent streams | ITL mean ms | TTFT p50 ms |")
    print("|---|---|---|")
    for c in (1, 2, 4, 8, 16):
        res = await asyncio.gather(*[one(client, a.model, f"story {i}", 48) for i in range(c)])
        itls = [r[1] for r in res if r[1]]
        print(f"| {c} | {statistics.mean(itls):.2f} | {statistics.median(r[0] for r in res):.1f} |")


asyncio.run(main())
