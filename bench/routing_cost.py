"""What ``domain: "auto"`` costs a request: the router's scoring (memories.routing.Router) with M synthetic profiles.

Profiles are made from Zipf-distributed token ids over the default base's
vocabulary (49,152, SmolLM2), each from ``--profile-tokens`` tokens, so the
matrix is the size a real server holds; the prompt's ids are random. Reports
the median and p99 per request of ``Router.route`` (clean ids, one row gather,
mean, threshold, argmax) for each prompt length, and the time to rebuild the
router (what every load or unload does). Tokenizing a text prompt comes on top
(the base's fast tokenizer; not measured here: no base is needed to run this).

    python -m bench.routing_cost [--memories 3 50] [--lengths 16 256 1024] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from memories.routing import Router, build_profile, windows


def profiles(count: int, vocab: int, tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        perm = rng.permutation(vocab)  # each memory its own frequent tokens
        ids = perm[np.minimum(rng.zipf(1.2, tokens), vocab) - 1]
        held = perm[np.minimum(rng.zipf(1.2, 2048), vocab) - 1]
        out[f"m{i}"] = build_profile(ids, vocab, windows(held))
    return out


def measure(router: Router, length: int, vocab: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, vocab, length).tolist() for _ in range(repeats)]  # as a request's ids arrive: a Python list
    times = []
    for p in prompts:
        t = time.perf_counter()
        router.route(p)
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, nargs="+", default=[3, 50])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--profile-tokens", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    every = profiles(max(args.memories), args.vocab, args.profile_tokens)
    print(f"vocabulary {args.vocab:,}; profiles of {args.profile_tokens:,} tokens; {args.repeats} requests per cell")
    print("| memories | router rebuild ms | " + " | ".join(f"{n} tokens: median / p99 ms" for n in args.lengths) + " |")
    print("|---|---|" + "---|" * len(args.lengths))
    for m in args.memories:
        chosen = {k: every[k] for k in list(every)[:m]}
        t = time.perf_counter()
        router = Router(chosen, args.vocab)
        rebuild = time.perf_counter() - t
        cells = [measure(router, n, args.vocab, args.repeats) for n in args.lengths]
        print(f"| {m} | {rebuild * 1e3:.1f} | " + " | ".join(f"{a * 1e3:.3f} / {b * 1e3:.3f}" for a, b in cells) + " |")


if __name__ == "__main__":
    main()
