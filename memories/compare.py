"""Which memory to build: every kind scored on the same text, in its own domain and from another source.

``memserve memory compare --memory DIR ... --out DIR`` reads built memories of
any kind and scores each with the one perplexity formula on

- its domain's validation and test splits (the corpus stage's own: same spec,
  caps and windows as the build, so the test positions are the ones its build
  reported),
- the same domain written elsewhere (``demo:DOMAIN/other-source``, or
  ``--other-source DOMAIN=SPEC``), split half validation, half test,
- for the memories named in ``--cross``, every other domain's sets too (the
  cross-domain matrix: does a domain memory beat the others and a control?).

A decoder memory is fused at its own λ and temperature (``mix_at_targets``,
i.e. ``memories.fuse``), a lora memory runs as PEFT applies it, a calm memory
composed by ``memories.calm.hf``. The base, and base + kNN-LM where the
decoder build's index is found under ``--work-root``, score the same
positions. A build's CPU minutes are the sum of its stages' ``cpu_seconds``.

For each domain's default decoder memory (the deepest with its own
embeddings and β > 0) it also tries λ rules meant to hold across sources,
each chosen on validation text only and reported on both test sets:
``own`` (memory.json's λ, chosen by the build on in-source validation),
``mixed`` (one λ chosen on validation text of both sources) and ``entropy``
(a per-token λ = σ(logit λ₀ + s·(H_base − H_memory)): more memory where the
base is unsure and the memory is not; λ₀ and s chosen on in-source validation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memories.flags import add_threads_argument, fraction
from memories.flops import flops_per_token, memory_flops_per_token
from memories.mixture import LAMBDA_GRID, mix_at_targets
from memories.perplexity import perplexity, scored_windows
from memories.windows import iter_windows

log = logging.getLogger("memserve.memory")

SPLITS = ("validation", "test")
SOURCES = ("own", "other")
# (λ₀, s) of the per-token entropy rule; s = 0 is a fixed λ, so the rule can only match or beat it on the data it is chosen on.
ENTROPY_SLOPES = (-0.5, 0.0, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class TextSet:
    domain: str
    source: str  # "own": the split of the memory's corpus; "other": the same domain from another source
    split: str
    spec: str
    tokens: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.source}/{self.split}"


@dataclass
class Scores:
    """At every scored position: log p(observed next token), and the entropy of the distribution (nats)."""

    logp: np.ndarray
    entropy: np.ndarray


def text_sets(domain: str, spec: str, other_spec: str | None, tok, eval_tokens: int, validation_fraction=0.05, test_fraction=0.05) -> list[TextSet]:
    """A domain's validation and test streams from its own corpus (as its build split it) and, if given, from another source."""
    from memories.corpus import load_corpus, split_documents, tokenize

    out = []
    sources = [("own", spec, validation_fraction, test_fraction)] + ([("other", other_spec, 0.5, 0.5)] if other_spec else [])
    for source, s, vf, tf in sources:
        splits = split_documents(load_corpus(s), vf, tf)
        for split in SPLITS:
            stream, _ = tokenize(tok, splits[split], eval_tokens + 1)
            out.append(TextSet(domain, source, split, s, stream))
    return out


@torch.inference_mode()
def score(logits_of, tokens: np.ndarray, context: int, stride: int, temperature: float = 1.0, desc: str = "", progress: bool = True) -> Scores:
    """``logits_of(ids [1, T]) -> [T, V]`` over the stream's windows, as ``memories.perplexity.model_logprobs`` scores them."""
    lps, ents = [], []
    for ids, offset, labels in scored_windows(tokens, context, stride, desc, progress):
        logp = torch.log_softmax(logits_of(ids)[offset:].float() / temperature, dim=-1)
        lps.append(logp.gather(-1, labels[:, None])[:, 0].numpy())
        ents.append(-(logp.exp() * logp).sum(-1).numpy())
    return Scores(np.concatenate(lps).astype(np.float64), np.concatenate(ents).astype(np.float64))


def _save(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically: a killed run leaves no half-written cache entry."""
    tmp = path.with_name(f".{path.name}.partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def labels_of(tokens: np.ndarray, context: int, stride: int) -> np.ndarray:
    return np.concatenate([tokens[w.first + 1 : w.end + 1] for w in iter_windows(len(tokens), context, stride)])


def _own_test(sets: list[TextSet]) -> TextSet:
    return next(s for s in sets if s.source == "own" and s.split == "test")


# --- the λ rules ---------------------------------------------------------------------------


def entropy_weights(base: Scores, memory: Scores, weight: float, slope: float) -> np.ndarray:
    """Per-token λ = σ(logit λ₀ + s·(H_base − H_memory))."""
    z = math.log(weight / (1 - weight)) + slope * (base.entropy - memory.entropy)
    return 1.0 / (1.0 + np.exp(-z))


def fused_ppl(base: Scores, memory: Scores, weight) -> float:
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    return perplexity(mix_at_targets(base.logp, memory.logp, w[:, None] if w.ndim else float(w)))


def choose_lambda(pairs: list[tuple[Scores, Scores]]) -> float:
    """The grid λ with the lowest perplexity over all positions of the given (base, memory) pairs."""
    base = Scores(np.concatenate([b.logp for b, _ in pairs]), np.concatenate([b.entropy for b, _ in pairs]))
    mem = Scores(np.concatenate([m.logp for _, m in pairs]), np.concatenate([m.entropy for _, m in pairs]))
    return min(LAMBDA_GRID, key=lambda w: fused_ppl(base, mem, w))


def choose_entropy_rule(base: Scores, memory: Scores) -> tuple[float, float]:
    grid = [(w, s) for w in LAMBDA_GRID if 0 < w < 1 for s in ENTROPY_SLOPES]
    return min(grid, key=lambda ws: fused_ppl(base, memory, entropy_weights(base, memory, *ws)))


def lambda_rules(own_weight: float, base: dict[str, Scores], memory: dict[str, Scores], domain: str) -> dict:
    """Test perplexity of the three λ rules on the domain's own and other-source test sets."""
    key = lambda source, split: f"{domain}/{source}/{split}"
    mixed = choose_lambda([(base[key(s, "validation")], memory[key(s, "validation")]) for s in SOURCES])
    w0, slope = choose_entropy_rule(base[key("own", "validation")], memory[key("own", "validation")])
    rules = {"own": {"lambda": own_weight}, "mixed": {"lambda": mixed}, "entropy": {"lambda0": w0, "slope": slope}}
    for source in SOURCES:
        b, m = base[key(source, "test")], memory[key(source, "test")]
        rules["own"][source] = fused_ppl(b, m, own_weight)
        rules["mixed"][source] = fused_ppl(b, m, mixed)
        rules["entropy"][source] = fused_ppl(b, m, entropy_weights(b, m, w0, slope))
    return rules


# --- memories ---------------------------------------------------------------------------------


@dataclass
class Entry:
    """One memory in the comparison: what it is, how it was built, what it costs."""

    name: str
    path: Path
    kind: str
    domain: str
    variant: str
    meta: dict
    work: Path | None
    flops: float  # the memory's own FLOPs per token ÷ the base's (memories.flops)
    default: bool = False  # a decoder memory as `memory build` makes it by default: own embeddings, β > 0

    @property
    def cpu_minutes(self) -> float | None:
        if self.work is None:
            return None
        seconds = [json.loads(p.read_text()).get("cpu_seconds", 0.0) for p in self.work.rglob("stage.json")]
        return sum(seconds) / 60 if seconds else None


def describe(path: Path, work_roots: list[Path], base_dir: str) -> Entry:
    """The memory at ``path``: kind, domain and a variant label read from memory.json and its build's config."""
    from memories.artifact import MEMORY_JSON
    from memories.kinds import kind_of

    meta = json.loads((path / MEMORY_JSON).read_text()) if (path / MEMORY_JSON).exists() else {}
    name = meta.get("name", path.name)
    kind = kind_of(path, name)
    work = next((r / path.name for r in work_roots if (r / path.name / "corpus").is_dir()), None)
    build = json.loads((work / "build.json").read_text()).get("config", {}) if work and (work / "build.json").exists() else {}
    flops = memory_flops_per_token(path) / flops_per_token(base_dir)
    if kind == "decoder":
        config = json.loads((path / "config.json").read_text())
        layers = config["num_hidden_layers"]
        base_layers = json.loads((Path(base_dir) / "config.json").read_text())["num_hidden_layers"]
        parts = ["decoder", "thin" if meta.get("embeddings") == "base" else "", f"{layers} layers" if layers < base_layers else "whole base"]
        parts.append("β=0 (cross-entropy only)" if build.get("beta") == 0 else "")
        variant = ", ".join(p for p in parts if p)
    elif kind == "lora":
        variant = "lora, generated" if "generator" in meta or "prompts" in meta else "lora, trained"
    else:
        variant = "calm"
    default = kind == "decoder" and meta.get("embeddings") != "base" and build.get("beta") != 0
    return Entry(name, path, kind, meta.get("domain", name), variant, meta, work, flops, default)


class Scorer:
    """Loads the base once; scores it and every memory on every text set, each at most once.

    With a ``cache`` folder each (model, set) result is also kept on disk, keyed by
    the model's files (names, sizes, times), the set's tokens and the windows, so a
    re-run with one more memory scores only that memory.
    """

    def __init__(self, base_dir: str, context: int, stride: int, progress: bool = True, cache: Path | None = None):
        from memories.base_model import load_base

        self.base_dir, self.context, self.stride, self.progress, self.cache = base_dir, context, stride, progress, cache
        self.base = load_base(base_dir)
        self.vocab = self.base.config.vocab_size
        self._base_scores: dict[str, Scores] = {}
        self._keys: dict[str, np.ndarray] = {}
        if cache:
            cache.mkdir(parents=True, exist_ok=True)

    def _cached(self, model_dir: Path, s: TextSet, temperature: float) -> Path | None:
        if self.cache is None:
            return None
        files = sorted(f for f in Path(model_dir).iterdir() if f.is_file())
        h = hashlib.sha256(json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode())
        h.update(np.ascontiguousarray(s.tokens).tobytes())
        h.update(json.dumps([s.key, self.context, self.stride, temperature]).encode())
        return self.cache / f"{Path(model_dir).name}-{h.hexdigest()[:16]}.npz"

    def base_scores(self, s: TextSet) -> Scores:
        if s.key in self._base_scores:
            return self._base_scores[s.key]
        path = self._cached(Path(self.base_dir), s, 1.0)
        if path is not None and path.exists():
            saved = np.load(path)
            self._base_scores[s.key], self._keys[s.key] = Scores(saved["logp"], saved["entropy"]), saved["keys"].astype(np.float32)
            return self._base_scores[s.key]
        from memories.decoder.datastore import capture_keys

        keys: list[np.ndarray] = []
        with capture_keys(self.base, -1) as seen:

            def logits_of(ids):
                seen.clear()
                logits = self.base(input_ids=ids).logits[0]
                keys.append(seen[-1][0])
                return logits

            scores = score(logits_of, s.tokens, self.context, self.stride, desc=f"base on {s.key}", progress=self.progress)
        offsets = [w.offset for w in iter_windows(len(s.tokens), self.context, self.stride)]
        # fp16, as the datastore and the held-out stage store keys
        self._keys[s.key] = np.concatenate([k[o:].half().float().numpy() for k, o in zip(keys, offsets)])
        self._base_scores[s.key] = scores
        if path is not None:
            _save(path, logp=scores.logp, entropy=scores.entropy, keys=self._keys[s.key].astype(np.float16))
        return scores

    def knnlm_ppls(self, e: Entry, sets: list[TextSet]) -> dict[str, float] | None:
        """base + kNN-LM over the decoder build's index on each set, at the build's tuned λ, temperature and k (None if no index)."""
        index_dir = e.work / "index" if e.work else None
        metrics = e.meta.get("metrics", {})
        if index_dir is None or not (index_dir / "values.npy").exists() or "knnlm_lambda" not in metrics:
            return None
        from memories.decoder.heldout import knnlm_ppl, neighbours
        from memories.decoder.index import load_index

        index, values = load_index(index_dir), np.load(index_dir / "values.npy")
        heldout = e.work / "heldout" / "stage.json"  # the build's k, as its held-out stage searched
        k = min(json.loads(heldout.read_text()).get("k", 1024) if heldout.exists() else 1024, index.ntotal)
        out = {}
        for s in sets:
            base = self.base_scores(s)
            dist, nbr = neighbours(index, values, self._keys[s.key], k)
            data = {"distances": dist, "values": nbr, "labels": labels_of(s.tokens, self.context, self.stride), "base_logp": base.logp}
            out[s.key] = knnlm_ppl(data, metrics["knnlm_temperature"], metrics["knnlm_lambda"], self.vocab)
        return out

    def memory_scores(self, e: Entry, sets: list[TextSet]) -> dict[str, Scores]:
        """The memory's own scores: a decoder memory alone (at its temperature), a lora or calm memory as the changed base."""
        temperature = float(e.meta.get("temperature", 1.0)) if e.kind == "decoder" else 1.0
        out, todo = {}, []
        for s in sets:
            path = self._cached(e.path, s, temperature)
            if path is not None and path.exists():
                saved = np.load(path)
                out[s.key] = Scores(saved["logp"], saved["entropy"])
            else:
                todo.append((s, path))
        if not todo:
            return out
        with self._logits_of(e) as logits_of:
            for s, path in todo:
                out[s.key] = score(logits_of, s.tokens, self.context, self.stride, temperature, f"{e.name} on {s.key}", self.progress)
                if path is not None:
                    _save(path, logp=out[s.key].logp, entropy=out[s.key].entropy)
        return out

    @contextlib.contextmanager
    def _logits_of(self, e: Entry):
        """``logits_of(ids)`` of the memory: a decoder memory alone, or the base changed by a lora or calm memory."""
        from memories.base_model import load_base

        if e.kind == "decoder":
            from memories.decoder.evaluate import load_memory_model

            model = load_memory_model(e.path, self.base)
            yield lambda ids: model(input_ids=ids).logits[0]
        elif e.kind == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_base(self.base_dir), str(e.path)).eval()
            yield lambda ids: model(input_ids=ids).logits[0]
        else:
            from memories.calm.hf import composed, load_calm

            augment, composition = load_calm(e.path)
            with composed(self.base, augment, composition):
                yield lambda ids: self.base(input_ids=ids).logits[0]


# --- the comparison -------------------------------------------------------------------------


def compare(memory_dirs: list[Path], base_dir: str, out: Path, work_roots: list[Path], other_sources: dict[str, str], cross: set[str],
            eval_tokens: int = 5000, fractions: tuple[float, float] = (0.05, 0.05), context: int = 512, stride: int = 512, progress: bool = True,
            served: dict[str, Path] | None = None) -> dict:  # fmt: skip
    """Score every memory; write ``report.json`` and ``report.md`` under ``out``; return the report.

    Raises ``ValueError`` when a build's own test split (its work folder's ``corpus/test.npy``)
    is not the one these options give: the numbers would not be comparable.
    """
    from transformers import AutoTokenizer

    from memories.artifact import write_json_atomic
    from memories.corpus import OTHER_SOURCES

    tok = AutoTokenizer.from_pretrained(base_dir)
    entries = [describe(Path(d), work_roots, base_dir) for d in memory_dirs]
    specs: dict[str, str] = {}
    for e in entries:
        spec = e.meta.get("corpus", {}).get("spec")
        if spec and specs.setdefault(e.domain, spec) != spec:
            raise ValueError(f"domain {e.domain!r} has memories built on {specs[e.domain]!r} and {spec!r}: give each corpus its own domain")
    if lost := [e.name for e in entries if e.domain not in specs]:
        raise ValueError(f"no corpus known for the domain of {', '.join(lost)}: compare it beside a memory of the same domain built from a corpus")
    sets: dict[str, list[TextSet]] = {}
    for domain, spec in specs.items():
        other = other_sources.get(domain) or (f"demo:{domain}/other-source" if spec == f"demo:{domain}" and domain in OTHER_SOURCES else None)
        sets[domain] = text_sets(domain, spec, other, tok, eval_tokens, *fractions)
    for e in entries:
        built = e.work / "corpus" / "test.npy" if e.work else None
        if built and built.exists() and not np.array_equal(np.load(built), _own_test(sets[e.domain]).tokens):
            raise ValueError(f"{e.name}: its build's test split is not this one; give compare the build's --eval-tokens, --validation-fraction and --test-fraction")
    all_sets = {s.key: s for ss in sets.values() for s in ss}
    scorer = Scorer(base_dir, context, stride, progress, out / "scores")

    defaults = {e.domain: max((x for x in entries if x.domain == e.domain and x.default), key=lambda x: x.flops, default=None) for e in entries}
    report: dict = {"sets": {k: {"spec": s.spec, "tokens": len(s.tokens)} for k, s in all_sets.items()}, "base": {}, "knnlm": {}, "memories": {}, "lambda_rules": {}}
    report["defaults"] = {d: e.name for d, e in defaults.items() if e is not None}  # each domain's default decoder memory
    for k, s in all_sets.items():
        report["base"][k] = perplexity(scorer.base_scores(s).logp)
    for e in entries:
        ruled = defaults[e.domain] is e and any(s.source == "other" for s in sets[e.domain])  # the domain's default decoder memory: λ rules
        # validation sets only for the λ rules; test sets of other domains only for --cross
        wanted = [s for s in all_sets.values() if (s.domain == e.domain and (ruled or s.split == "test")) or (e.name in cross and s.split == "test")]
        mem = scorer.memory_scores(e, wanted)
        ppl = {}
        for s in wanted:
            base = scorer.base_scores(s)
            ppl[s.key] = fused_ppl(base, mem[s.key], float(e.meta.get("lambda", 0.0))) if e.kind == "decoder" else perplexity(mem[s.key].logp)
        report["memories"][e.name] = {"kind": e.kind, "variant": e.variant, "domain": e.domain, "lambda": e.meta.get("lambda"), "cpu_minutes": e.cpu_minutes, "flops": e.flops, "ppl": ppl}
        if served and e.name in served:
            report["memories"][e.name]["served"] = served_ratios(served[e.name])
        if ruled:
            base_scores = {k: scorer.base_scores(all_sets[k]) for k in mem}
            report["lambda_rules"][e.name] = lambda_rules(float(e.meta["lambda"]), base_scores, mem, e.domain)
        if e.kind == "decoder" and e.domain not in report["knnlm"]:
            knn = scorer.knnlm_ppls(e, [s for s in sets[e.domain] if s.split == "test"])
            if knn is not None:
                report["knnlm"][e.domain] = knn
        log.info("compare: %s (%s) scored on %d sets", e.name, e.variant, len(wanted))
    report["targets"] = targets(report)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    return report


def served_ratios(bench_json: Path) -> dict[str, float]:
    """Memory ÷ base output tokens/s per stream count, from a ``memserve bench --json`` file (median of its rounds)."""
    result = json.loads(Path(bench_json).read_text())
    return {str(run["streams"]): run["scenarios"]["memory"]["ratio_to_base"] for run in result["runs"] if "memory" in run["scenarios"]}


# --- verdicts and the report -----------------------------------------------------------------


def targets(report: dict) -> dict:
    """The comparison's targets, each met or not, per domain (None: not measured)."""
    mems, base = report["memories"], report["base"]
    out = {}
    for domain in sorted({m["domain"] for m in mems.values()}):
        own, other = f"{domain}/own/test", f"{domain}/other/test"
        d = report["defaults"].get(domain)
        crossed = {n: m["ppl"][own] for n, m in mems.items() if own in m["ppl"] and m["domain"] != domain and n in report["defaults"].values()}
        loras = [m["ppl"][own] for m in mems.values() if m["domain"] == domain and m["variant"] == "lora, trained" and own in m["ppl"]]
        small = {}  # per kind, the best in-domain ratio to the base among its memories at most a third of the base's FLOPs
        for m in mems.values():
            if m["domain"] == domain and m["flops"] <= 1 / 3 and own in m["ppl"]:
                small[m["kind"]] = min(small.get(m["kind"], math.inf), m["ppl"][own] / base[own])
        out[domain] = {
            "beats_other_memories_and_control": (all(mems[d]["ppl"][own] < p for p in crossed.values()) if d and crossed else None),
            "default_decoder_at_or_below_same_budget_lora": (mems[d]["ppl"][own] <= min(loras) if d and loras else None),
            "other_source_gain_at_own_lambda": (1 - mems[d]["ppl"][other] / base[other] if d and other in mems[d]["ppl"] else None),
            "at_most_a_third_of_base_flops_ppl_ratio_by_kind": small or None,
        }
    return out


def _served(ratios: dict | None) -> str:
    return "—" if not ratios else " / ".join(_f(ratios.get(n)) for n in ("1", "8"))


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    base, mems = r["base"], r["memories"]
    lines = ["# Which memory to build: every kind on the same text", ""]
    lines += [("Test perplexity (÷ base in brackets) on the domain's own test split and on the same domain from another source; "
              "decoder memories fused at their own λ. Build CPU minutes: the sum of the build's stages' `cpu_seconds`."), ""]
    lines += ["| domain | system | in-domain test | other-source test | λ | memory FLOPs ÷ base | build CPU-min | served ÷ base, 1 / 8 streams |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for domain in sorted({m["domain"] for m in mems.values()}):
        own, other = f"{domain}/own/test", f"{domain}/other/test"

        def cell(p, key):
            return "—" if p is None or key not in base else f"{p:.2f} ({p / base[key]:.3f})"

        lines.append(f"| {domain} | base | {cell(base.get(own), own)} | {cell(base.get(other), other)} | | | | |")
        knn = r["knnlm"].get(domain, {})
        if knn:
            lines.append(f"| {domain} | base + kNN-LM | {cell(knn.get(own), own)} | {cell(knn.get(other), other)} | | | | |")
        for n, m in mems.items():
            if m["domain"] == domain:
                lines.append(f"| {domain} | {m['variant']} (`{n}`) | {cell(m['ppl'].get(own), own)} | {cell(m['ppl'].get(other), other)} | {_f(m['lambda'])} | {_f(m['flops'], '{:.4f}')} | {_f(m['cpu_minutes'], '{:.1f}')} | {_served(m.get('served'))} |")
    crossing = [n for n, m in mems.items() if sum(1 for k in m["ppl"] if not k.startswith(m["domain"] + "/")) > 0]
    if crossing:
        test_sets = [k for k in r["sets"] if k.endswith("/test")]
        lines += ["", "## Cross-domain matrix (test perplexity ÷ base; rows: memories, columns: text)", ""]
        lines += ["| memory | " + " | ".join(test_sets) + " |", "|---|" + "---:|" * len(test_sets)]
        for n in crossing:
            ppl = mems[n]["ppl"]
            lines.append(f"| `{n}` ({mems[n]['domain']}) | " + " | ".join(_f(ppl[k] / base[k], "{:.3f}") if k in ppl else "—" for k in test_sets) + " |")
    if r["lambda_rules"]:
        lines += ["", "## λ rules (test perplexity ÷ base; chosen on validation only)", ""]
        lines += ["| memory | rule | chosen | own source | other source |", "|---|---|---|---:|---:|"]
        for n, rules in r["lambda_rules"].items():
            d = mems[n]["domain"]
            for rule, v in rules.items():
                chosen = f"λ₀ {v['lambda0']}, s {v['slope']}" if rule == "entropy" else f"λ {v['lambda']}"
                lines.append(f"| `{n}` | {rule} | {chosen} | {v['own'] / base[d + '/own/test']:.3f} | {v['other'] / base[d + '/other/test']:.3f} |")
    lines += ["", "## Targets", "", "```", json.dumps(r["targets"], indent=1), "```", ""]
    lines += ["Sets: " + "; ".join(f"`{k}` {v['spec']} ({v['tokens']} tokens)" for k, v in r["sets"].items()), ""]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def add_compare_command(subparsers) -> None:
    text = "score built memories of every kind on the same text (own domain, another source, other domains): a table, a cross-domain matrix and λ rules"
    p = subparsers.add_parser("compare", help=text, description=text)
    p.add_argument("--memory", action="append", required=True, type=Path, metavar="DIR", help="a built memory (any kind); repeat for each")
    p.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    p.add_argument("--base", default=None, help="base directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--work-root", action="append", type=Path, default=[], metavar="DIR", help="where builds keep work folders (NAME/ below it), for CPU minutes and kNN-LM; repeatable (default: none)")
    p.add_argument("--other-source", action="append", default=[], metavar="DOMAIN=SPEC", help="the domain's text from another source (default for demo domains: demo:DOMAIN/other-source)")
    p.add_argument("--bench", action="append", default=[], metavar="NAME=FILE", help="a `memserve bench --json` file measured with memory NAME (or one of its kind): the served column (default: none)")
    p.add_argument("--cross", default="", metavar="NAME[,NAME...]", help="memories also scored on every other domain's test sets (default: none)")
    p.add_argument("--eval-tokens", type=int, default=5000, help="tokens per validation and test set, as the builds' --eval-tokens (default: %(default)s, the demo memories')")
    p.add_argument("--validation-fraction", type=fraction, default=0.05, help="as the builds' (default: %(default)s)")
    p.add_argument("--test-fraction", type=fraction, default=0.05, help="as the builds' (default: %(default)s)")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--stride", type=int, default=512, help="new positions per window (default: %(default)s)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    import sys

    from memories.base_model import default_base
    from memories.stage import set_threads

    pairs = {}
    for flag, items in (("--other-source", args.other_source), ("--bench", args.bench)):
        pairs[flag] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                print(f"memserve memory compare: {flag} wants NAME=VALUE, got {item!r}", file=sys.stderr)
                return 2
            pairs[flag][key] = value if flag == "--other-source" else Path(value)
    if missing := [str(f) for f in pairs["--bench"].values() if not f.is_file()]:
        print(f"memserve memory compare: --bench file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    for d in args.memory:
        if not d.is_dir():
            print(f"memserve memory compare: --memory {d}: not a directory", file=sys.stderr)
            return 2
    set_threads(args.threads)
    cross = {n for n in args.cross.split(",") if n}
    try:
        compare(args.memory, args.base or str(default_base()), args.out, args.work_root, pairs["--other-source"], cross, args.eval_tokens,
                (args.validation_fraction, args.test_fraction), args.context, args.stride, not args.no_progress, pairs["--bench"])  # fmt: skip
    except ValueError as e:
        print(f"memserve memory compare: {e}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    return 0
