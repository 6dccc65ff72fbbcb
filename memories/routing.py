"""Routing for ``domain: "auto"``: which loaded memory a prompt belongs to, or none (docs/CONTRACT.md, "Routing profile").

The model, and why
------------------
Every kind of memory shares the base's tokenizer, so a memory's own text can be
summarised as a **unigram profile over the base's token ids**: how often each id
occurs in the text the memory was made from (a decoder's or calm memory's train
split, a generated lora's prompts, or ``routing_prompts`` an admin sends).

A prompt ``x_1..x_T`` is scored against profile ``m`` by its mean per-token
log-likelihood ratio against a fixed background ``b``::

    score_m(x) = 1/T · Σ_t [ log p_m(x_t) − log b(x_t) ]
    p_m(v)     = (1 − s_m) · c_m(v) / N_m + s_m · b(v)          (Jelinek-Mercer)
    s_m        = U_m / (U_m + N_m)                                (Witten-Bell)

``c_m`` are the profile's counts, ``N_m`` its tokens, ``U_m`` its distinct ids;
``s_m`` is Witten-Bell's estimate of the chance that the next token is one the
text never showed, so a profile made from 500 prompt tokens is smoothed far more
than one made from 200,000 training tokens, with no knob to tune.

The background ``b`` is **uniform over the base's vocabulary**. It is the one
background that needs no data: no other memory's text, no shipped corpus. Being
fixed, it keeps a score's meaning independent of which memories happen to be
loaded, so the per-profile threshold computed when the memory is built stays
valid on any server. The choice between memories does not depend on ``b`` at all
(it cancels in the argmax: this is multinomial naive Bayes with equal priors);
``b`` only sets the zero of the scale the "none" threshold lives on. The cost
of the uniform background is that common words (shared by every domain) score
positive for every memory, so "none" rests on the threshold seeing enough
out-of-domain evidence (tokens the memory rarely or never saw, each worth down
to ``log s_m``); a short prompt made only of function words can be routed.

Decision: a memory is a candidate when its score reaches its own threshold
(``routing.json`` ``threshold``); the candidate with the highest score wins;
no candidate means none.

Threshold (calibration at build time, on windows of ``CALIBRATION_WINDOW`` tokens):

- with out-of-domain text: the value that best separates the memory's own
  validation windows (should route) from out-of-domain windows (should not),
  by balanced accuracy, centred in the widest gap among the best
  (``calibration.method`` ``"ood"``);
- without (the fallback, ``"in-domain-quantile"``): the score of the 5th-percentile
  validation window (``q``) with a quarter of its tokens replaced by tokens the
  memory never saw, ``q − 0.25 · (q − log s_m)`` (replacing a share ``f`` of a
  window's tokens by unseen ones moves its mean score by ``f`` times its distance
  to ``log s_m``). A prompt is routed when it looks at least that much like the
  memory's own text. Measured on synthetic corpora (half shared Zipfian function
  words, half domain words; two memories of 5,000 training tokens; 200 prompts
  each): in-domain prompts routed
  100% at 16 and 64 tokens, out-of-domain prompts (same function words, other
  content) sent to none 81% at 16 tokens and 99.5% at 64; a threshold calibrated
  on out-of-domain text: 100% / 100% in-domain, 93% / 99.5% to none.
  Profiles made from prompts alone (no validation split) hold out every other
  prompt for this (each prompt a window); a single prompt, with nothing to hold
  out, gets the threshold halfway between its own in-sample score and ``log s_m``,
  the score of a token it never showed (``"half-unseen"``).

Serving: :class:`Router` holds one ``[vocab × memories]`` float32 matrix of the
per-token log-ratios; scoring a prompt is one row gather over its ids and a
mean, so the cost grows with the prompt, and barely with the memories.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

ROUTING_JSON = "routing.json"
FORMAT = 1
MODEL = "unigram-llr"
BACKGROUND = "uniform"
CALIBRATION_WINDOW = 64
MAX_ROUTING_TOKENS = 1024  # the server routes on a prompt's last this-many tokens (bounds the cost of a long prompt)
MIN_SMOOTHING = 1e-3
FALLBACK_QUANTILE = 0.05  # without out-of-domain text: the in-domain window score the threshold starts from ...
FALLBACK_UNSEEN = 0.25  # ... with this share of its tokens replaced by tokens the memory never saw


class RoutingError(ValueError):
    """A routing profile that cannot be read or does not fit the base."""


@dataclass
class Profile:
    """A memory's unigram profile over the base's token ids, and its "none" threshold."""

    vocab_size: int
    ids: np.ndarray  # sorted distinct token ids seen
    counts: np.ndarray  # their counts
    threshold: float = 0.0
    source: str = ""
    tokenizer_sha256: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    _column: np.ndarray | None = field(default=None, repr=False, compare=False)  # log_ratios, computed once

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def smoothing(self) -> float:
        """Witten-Bell: distinct ids / (distinct ids + tokens), the share of the uniform background."""
        n, u = self.tokens, len(self.ids)
        return float(min(0.5, max(MIN_SMOOTHING, u / (u + n)))) if n else 1.0

    def log_ratios(self) -> np.ndarray:
        """``log p_m(v) − log b(v)`` for every id ``v`` of the vocabulary (float32 ``[vocab]``; computed once, do not modify)."""
        if self._column is not None and len(self._column) == self.vocab_size:
            return self._column
        s, v = self.smoothing, self.vocab_size
        column = np.full(v, math.log(s), dtype=np.float64)  # unseen: s · b(v) / b(v)
        if len(self.ids):
            column[self.ids] = np.log((1.0 - s) * self.counts / self.tokens * v + s)
        self._column = column.astype(np.float32)
        return self._column

    def score(self, ids: Sequence[int]) -> float:
        ids = _clean_ids(ids, self.vocab_size)
        return float(self.log_ratios()[ids].mean()) if len(ids) else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": MODEL,
            "background": BACKGROUND,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "source": self.source,
            "tokens": self.tokens,
            "smoothing": self.smoothing,
            "threshold": self.threshold,
            "calibration": self.calibration,
            "ids": self.ids.tolist(),
            "counts": self.counts.tolist(),
        }


def _clean_ids(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    a = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
    return a[(a >= 0) & (a < vocab_size)]


def count_profile(ids: Iterable[int], vocab_size: int, source: str = "", tokenizer_sha256: str | None = None) -> Profile:
    """A profile's counts from token ids (no threshold yet: see :func:`calibrate`)."""
    a = _clean_ids(ids, vocab_size)
    uniq, counts = np.unique(a, return_counts=True)
    return Profile(vocab_size, uniq.astype(np.int64), counts.astype(np.int64), source=source, tokenizer_sha256=tokenizer_sha256)


def windows(stream: np.ndarray | Sequence[int], size: int = CALIBRATION_WINDOW, min_tokens: int | None = None) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of ``size`` tokens (a shorter one is kept if it has ≥ ``min_tokens``, default size/4)."""
    a = np.asarray(stream, dtype=np.int64).reshape(-1)
    out = [a[i : i + size] for i in range(0, len(a), size)]
    return [w for w in out if len(w) >= (max(1, size // 4) if min_tokens is None else min_tokens)]


def window_scores(profile: Profile, docs: Iterable[Sequence[int]]) -> np.ndarray:
    column = profile.log_ratios()
    out = []
    for d in docs:
        d = _clean_ids(d, profile.vocab_size)
        if len(d):
            out.append(float(column[d].mean()))
    return np.asarray(out, dtype=np.float64)


def calibrate(profile: Profile, in_domain: Iterable[Sequence[int]], out_of_domain: Iterable[Sequence[int]] = ()) -> Profile:
    """Set ``profile.threshold`` from held-out in-domain windows and, when given, out-of-domain ones (module docstring)."""
    pos = window_scores(profile, in_domain)
    neg = window_scores(profile, out_of_domain)
    base = {"window": CALIBRATION_WINDOW, "in_domain_windows": int(len(pos)), "ood_windows": int(len(neg))}
    if len(pos) == 0:  # nothing held out (a single prompt): halfway between its own text, scored in sample, and an unseen token
        column = profile.log_ratios()
        own = float((column[profile.ids] * profile.counts).sum() / max(profile.tokens, 1)) if profile.tokens else 0.0
        profile.threshold = 0.5 * (own + math.log(profile.smoothing))
        profile.calibration = {"method": "half-unseen", **base, "in_sample_mean": own}
        return profile
    median = float(np.median(pos))
    if len(neg) == 0:
        low = float(np.quantile(pos, FALLBACK_QUANTILE))
        profile.threshold = low - FALLBACK_UNSEEN * (low - math.log(profile.smoothing))
        profile.calibration = {"method": "in-domain-quantile", "quantile": FALLBACK_QUANTILE, "unseen_share": FALLBACK_UNSEEN, **base, "in_domain_median": median, "in_domain_quantile": low}
        return profile
    profile.threshold, accuracy = _best_threshold(pos, neg)
    profile.calibration = {"method": "ood", **base, "in_domain_median": median, "ood_median": float(np.median(neg)), "balanced_accuracy": accuracy}
    return profile


def _best_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Threshold with the best balanced accuracy (route: score ≥ t), centred in the widest gap among the best."""
    values = np.unique(np.concatenate([pos, neg]))
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    gaps = np.concatenate([[1.0], np.diff(values), [1.0]])
    tpr = (pos[None, :] >= cuts[:, None]).mean(1)
    tnr = (neg[None, :] < cuts[:, None]).mean(1)
    acc = (tpr + tnr) / 2
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    i = best[np.argmax(gaps[best])]
    return float(cuts[i]), float(acc[i])


def build_profile(
    train_ids: Iterable[int],
    vocab_size: int,
    validation: Iterable[Sequence[int]] = (),
    out_of_domain: Iterable[Sequence[int]] = (),
    source: str = "",
    tokenizer_sha256: str | None = None,
) -> Profile:
    """Counts from ``train_ids``; threshold from ``validation`` windows (and ``out_of_domain`` windows, if any)."""
    return calibrate(count_profile(train_ids, vocab_size, source, tokenizer_sha256), validation, out_of_domain)


def profile_from_corpus_stage(corpus_dir: str | os.PathLike, tokenizer, source: str = "train split") -> Profile:
    """The build's profile: counts from the corpus stage's train stream, threshold from its validation stream's windows."""
    from memories.artifact import tokenizer_sha256

    d = Path(corpus_dir)
    train = np.load(d / "train.npy")
    validation = np.load(d / "validation.npy") if (d / "validation.npy").exists() else np.zeros(0, dtype=np.int64)
    return build_profile(train, len(tokenizer), windows(validation), source=source, tokenizer_sha256=tokenizer_sha256(tokenizer))


def profile_from_texts(texts: Sequence[str], tokenizer, source: str = "prompts", out_of_domain: Sequence[str] = ()) -> Profile:
    """A profile from texts (prompts): counts from all; threshold from every other text held out of a profile of the rest."""
    from memories.artifact import tokenizer_sha256

    vocab = len(tokenizer)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ood = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in out_of_domain]
    sha = tokenizer_sha256(tokenizer)
    full = count_profile([i for d in docs for i in d], vocab, source, sha)
    if len(docs) >= 2:  # calibrate on held-out texts against a profile of the others, then keep the threshold
        held = count_profile([i for d in docs[0::2] for i in d], vocab)
        calibrate(held, [w for d in docs[1::2] for w in windows(d, min_tokens=1)], [w for d in ood for w in windows(d, min_tokens=1)])
        full.threshold, full.calibration = held.threshold, {**held.calibration, "held_out": "every other text"}
        return full
    return calibrate(full, [], [w for d in ood for w in windows(d)])


def write_profile(directory: str | os.PathLike, profile: Profile) -> Path:
    from memories.artifact import write_json_atomic

    path = Path(directory) / ROUTING_JSON
    write_json_atomic(path, profile.to_json())
    path.chmod(0o644)
    return path


def read_profile(directory: str | os.PathLike, vocab_size: int | None = None) -> Profile | None:
    """The artifact's ``routing.json``, or None when it has none (an older artifact: loads, but is not routable).

    ``vocab_size``: the base tokenizer's length; a profile naming ids beyond it is refused.
    """
    path = Path(directory) / ROUTING_JSON
    if not path.is_file():
        return None
    return read_profile_file(path, vocab_size)


def read_profile_file(path: str | os.PathLike, vocab_size: int | None = None) -> Profile:
    """A routing profile from a file of ``routing.json``'s form (an artifact's, or one the memory store keeps)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RoutingError(f"{ROUTING_JSON} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise RoutingError(f"{ROUTING_JSON} must be a JSON object")
    if data.get("format", FORMAT) != FORMAT or data.get("model", MODEL) != MODEL or data.get("background", BACKGROUND) != BACKGROUND:
        raise RoutingError(f"{ROUTING_JSON}: format {data.get('format')!r}, model {data.get('model')!r}, background {data.get('background')!r}; this server reads format 1, {MODEL}, {BACKGROUND}")
    try:
        ids = np.asarray(data["ids"], dtype=np.int64)
        counts = np.asarray(data["counts"], dtype=np.int64)
        threshold = float(data["threshold"])
        size = int(data["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise RoutingError(f"{ROUTING_JSON}: missing or malformed field: {e}") from None
    if ids.ndim != 1 or ids.shape != counts.shape or (len(counts) and counts.min() <= 0) or not math.isfinite(threshold):
        raise RoutingError(f"{ROUTING_JSON}: ids and counts must be equal-length lists, counts positive, threshold finite")
    if vocab_size is not None:
        size = vocab_size
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        raise RoutingError(f"{ROUTING_JSON}: token id {int(ids.max())} is outside the base's vocabulary of {size}")
    order = np.argsort(ids)
    return Profile(size, ids[order], counts[order], threshold, str(data.get("source", "")), data.get("tokenizer_sha256"), dict(data.get("calibration") or {}))


@dataclass(frozen=True)
class Route:
    memory: str | None  # the chosen memory, or None
    scores: dict[str, float]  # every routable memory's score
    thresholds: dict[str, float]


class Router:
    """All loaded profiles as one ``[vocab × memories]`` matrix; :meth:`route` is a gather and a mean."""

    def __init__(self, profiles: dict[str, Profile], vocab_size: int | None = None):
        self.names = sorted(profiles)
        sizes = {p.vocab_size for p in profiles.values()}
        self.vocab_size = vocab_size or (max(sizes) if sizes else 0)
        self.thresholds = np.asarray([profiles[n].threshold for n in self.names], dtype=np.float32)
        matrix = np.empty((self.vocab_size, len(self.names)), dtype=np.float32)
        for j, n in enumerate(self.names):
            p = profiles[n]
            if p.vocab_size != self.vocab_size:
                p = Profile(self.vocab_size, p.ids[p.ids < self.vocab_size], p.counts[p.ids < self.vocab_size], p.threshold)
            matrix[:, j] = p.log_ratios()
        self.matrix = matrix

    def __len__(self) -> int:
        return len(self.names)

    def scores(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Every memory's score for ``ids`` (float32 ``[memories]``); zeros for a prompt with no known ids."""
        return self._scores(_clean_ids(ids, self.vocab_size)[-MAX_ROUTING_TOKENS:])

    def _scores(self, a: np.ndarray) -> np.ndarray:
        if not len(a) or not self.names:
            return np.zeros(len(self.names), dtype=np.float32)
        return self.matrix[a].mean(axis=0)

    def route(self, ids: Sequence[int] | np.ndarray) -> Route:
        """The chosen memory (None: no profile's threshold is reached, or no routable memory, or no known ids) and the scores."""
        a = _clean_ids(ids, self.vocab_size)[-MAX_ROUTING_TOKENS:]
        s = self._scores(a)
        chosen = None
        if len(s) and len(a):
            ok = s >= self.thresholds
            if ok.any():
                chosen = self.names[int(np.argmax(np.where(ok, s, -np.inf)))]
        return Route(chosen, {n: float(v) for n, v in zip(self.names, s)}, {n: float(t) for n, t in zip(self.names, self.thresholds)})
