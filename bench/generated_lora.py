"""End-to-end check of run-time generation against a running server: prompts in, memory served, unloaded.

Against a server started with a generator and the admin API, e.g.
``MEMSERVE_CACHE=... memserve serve --memory-root DIR --admin-insecure-local``
(the demo generator in the cache is picked up), this posts the first N train
documents of a held-out domain as prompts, prints the card and timings, sends
one concurrent batch mixing the base, every loaded decoder memory and the
generated memory through the official openai client, then unloads it:

    python -m bench.generated_lora --url http://127.0.0.1:8000 --domain demo:bbc/tech --prompts 32
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generated_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    p.add_argument("--token", default=None, help="admin token (default: none, for --admin-insecure-local)")
    p.add_argument("--domain", default="demo:bbc/tech", help="corpus spec whose train documents become the prompts (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=32, help="how many documents (default: %(default)s)")
    p.add_argument("--chars", type=int, default=2000, help="characters kept per document (default: %(default)s)")
    p.add_argument("--name", default="generated", help="name of the generated memory (default: %(default)s)")
    p.add_argument("--query", default="Apple has announced a new version of its", help="prompt of the mixed batch (default: %(default)r)")
    opts = p.parse_args(argv)

    import httpx
    from openai import OpenAI

    from memories.corpus import load_corpus, split_documents

    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
    docs = split_documents(load_corpus(opts.domain))["train"][: opts.prompts]
    start = time.perf_counter()
    r = httpx.post(opts.url + "/admin/memories", json={"name": opts.name, "prompts": [d.text[: opts.chars] for d in docs]}, headers=headers, timeout=600)
    wall = time.perf_counter() - start
    if r.is_error:
        print(f"error {r.status_code}: {r.text}")
        return 1
    card = r.json()
    print(f"generated {card['name']!r} ({card['kind']}, rank {card['rank']}, {card['target_modules']}) from {card['prompts']['count']} prompts: "
          f"generation {card['generation_seconds']:.2f} s, load {card['load_seconds']:.3f} s, request {wall:.2f} s")  # fmt: skip
    client = OpenAI(base_url=opts.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    batch = [m.id for m in client.models.list().data]  # the base, every loaded memory, the generated one

    def run(model: str) -> tuple[str, str, str]:
        raw = client.completions.with_raw_response.create(model=model, prompt=opts.query, max_tokens=24, temperature=0)
        return model, raw.headers["X-Memserve-Memory"], raw.parse().choices[0].text

    with ThreadPoolExecutor(len(batch)) as pool:
        for model, served_by, text in pool.map(run, batch):
            print(f"{model:>24} (served by {served_by}): {text!r}")
    d = httpx.delete(f"{opts.url}/admin/memories/{opts.name}", headers=headers, timeout=300).json()
    print(f"unloaded: drained={d['drained']} in {d['seconds']:.3f} s")
    gone = httpx.post(opts.url + "/v1/completions", json={"model": opts.name, "prompt": "x", "max_tokens": 1}, timeout=60)
    print(f"request for {opts.name!r} after unload: HTTP {gone.status_code}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
