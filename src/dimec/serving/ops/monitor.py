"""Drift monitoring: what the served traffic looks like against what the router was calibrated on.

Three distributions, each per model (the `model` label is `model_label(manifest)`, the same for every package
of one export):

    dimec_drift_routing_distance{model}      histogram: distance of a text's routing embedding (the pooled
                                             embedding-layer output) to the nearest routing centroid
                                             (DIMEC-DC's pool means; the validation mean for other routers)
    dimec_drift_routed_total{model,tier}     counter: the tier the routing policy chose
    dimec_drift_confidence{model,exit}       histogram: max-probability of the exit that answered

`export` writes the same quantities on the validation split, binned with the same edges (deciles of the
validation values), to `drift_reference.json` in every package; the servers build their histograms from
those edges, so live counts and reference counts line up bin for bin. `dimec monitor URL...` scrapes the
/metrics of one or more tiers (or a gateway), and computes the population stability index of each
distribution against the reference:

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)     p: live shares, q: reference shares, each smoothed by +0.5

(0 for identical distributions; by the usual rule of thumb < 0.1 no shift, 0.1-0.25 moderate, > 0.25 major.)
It exits 1 and names the distribution when one is past `--threshold` (default 0.25) with at least
`--min-samples` live observations. Why PSI rather than a two-sample test: with thousands of live samples a
test rejects for shifts too small to matter, while PSI measures the size of the shift; its noise floor,
about (bins - 1) * (1/n_live + 1/n_reference), is printed beside it. docs/fleet.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dimec.errors import ArtifactError, ConfigError, DimecError
from dimec.rundir import DRIFT_REFERENCE, RunDir
from dimec.tiers import TIERS

REFERENCE_FORMAT = 2  # 2: "routed" counts the tier a plan starts on (as the live counter does)
BINS = 10
DISTANCE, ROUTED, CONFIDENCE = "dimec_drift_routing_distance", "dimec_drift_routed", "dimec_drift_confidence"
EXIT_NAMES = ("m", "n", "l")


def model_label(manifest: dict[str, Any]) -> str:
    """One id per export, the same in every tier package: the manifest's own `model_id` when it has one,
    else a hash over what all packages of one export share."""
    if manifest.get("model_id"):
        return str(manifest["model_id"])[:16]
    shared = {k: manifest.get(k) for k in ("exit_layers", "label_names", "task", "max_length", "source_run")}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


# ---- the reference, written at export ---------------------------------------------------------------------------
def quantile_edges(values: np.ndarray, bins: int = BINS, decimals: int = 6) -> list[float]:
    """Interior bin edges (upper bounds, the last bin is +Inf): the distinct quantiles of `values`, rounded
    to `decimals` so that no bin is narrower than numerical noise (fp32 vs int8, rounded probabilities)."""
    if not len(values):
        return []
    q = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return [float(x) for x in np.unique(np.round(q, decimals))]


def bin_counts(values: np.ndarray, edges: list[float]) -> list[int]:
    """Counts per bin (edge[i-1], edge[i]], the last bin above every edge: what a Prometheus histogram
    with these bucket bounds counts."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(index, minlength=len(edges) + 1).astype(int).tolist()


def routing_anchors(router, embeddings: np.ndarray) -> np.ndarray:
    """(K, H) the points routing distances are measured to: the router's centroids when it has them."""
    centroids = getattr(router, "centroids_", None)
    if centroids is not None:
        centroids = np.asarray(centroids, dtype=np.float64)
        centroids = centroids[~np.isnan(centroids).any(1)]
        if len(centroids):
            return centroids
    return np.asarray(embeddings, dtype=np.float64).mean(0, keepdims=True)


def routing_distances(embeddings: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(N, H), (K, H) -> (N,) Euclidean distance to the nearest anchor."""
    x = np.asarray(embeddings, dtype=np.float64)
    d2 = (x**2).sum(1)[:, None] - 2 * x @ anchors.T + (anchors**2).sum(1)[None]  # (N, K)
    return np.sqrt(np.clip(d2.min(1), 0, None))


def start_tiers(router, outputs) -> np.ndarray:
    """(N,) the tier each sample's plan starts on: what the policy chose before any layer ran, as the live
    `routed` counter counts it (not the tier that answered: a cascade starts everything on the phone)."""
    choice = router.choose_plans(outputs.embeddings, outputs.lengths)
    return np.array([router.plans_[c][0].tier for c in choice], dtype=np.int64)


def build_reference(outputs, router, cost_model, model: str, bins: int = BINS) -> dict[str, Any]:
    """The three distributions on validation outputs (ExitOutputs), routed by the run's router."""
    decisions = router.route(outputs, cost_model)
    anchors = routing_anchors(router, outputs.embeddings)
    distances = routing_distances(outputs.embeddings, anchors)
    answered = outputs.probs.max(-1)[np.arange(len(outputs)), decisions.exit_index]  # (N,)
    conf_edges = quantile_edges(answered, bins, decimals=3)  # confidences: 0.001 is the finest bin
    d_edges = quantile_edges(distances, bins)
    return {
        "format_version": REFERENCE_FORMAT, "model": model, "samples": len(outputs), "router": router.name,
        "anchors": anchors.round(6).tolist(),
        "routing_distance": {"edges": d_edges, "counts": bin_counts(distances, d_edges)},
        "routed": {"counts": np.bincount(start_tiers(router, outputs), minlength=len(TIERS)).astype(int).tolist()},
        "confidence": {"edges": conf_edges,
                       "counts": {EXIT_NAMES[k]: bin_counts(answered[decisions.exit_index == k], conf_edges)
                                  for k in range(3)}},
    }


def write_reference(run_dir: str | Path, package_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """At export: the reference from the run's validation outputs and router, into the run directory
    (once) and the package."""
    from dimec.atomic import write_json
    from dimec.costs import CostModel
    from dimec.pipeline import split_outputs
    from dimec.routing.base import load_router

    run = RunDir(run_dir)
    if not run.router.is_file():  # an uncalibrated run: nothing to compare with (monitor says so)
        return None
    model = model_label(manifest)
    reference = None
    if run.drift_reference.is_file():
        reference = json.loads(run.drift_reference.read_text())
        if reference.get("model") != model or reference.get("format_version") != REFERENCE_FORMAT:
            reference = None
    if reference is None:
        router, raw = load_router(run.router)
        reference = build_reference(split_outputs(run.root, "validation"), router,
                                    CostModel.from_dict(raw["cost_model"]), model)
        write_json(run.drift_reference, reference)
    write_json(Path(package_dir) / DRIFT_REFERENCE, reference)
    return reference


def read_reference(path: str | Path) -> dict[str, Any]:
    """A reference file, or the one in a package, an export folder or a run directory."""
    path = Path(path)
    for candidate in (path, path / DRIFT_REFERENCE, path / "mobile" / DRIFT_REFERENCE,
                      path / "packages" / "mobile" / DRIFT_REFERENCE):
        if candidate.is_file():
            try:
                reference = json.loads(candidate.read_text())
            except (OSError, ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge numbers, deep nesting
                raise ArtifactError(f"{candidate} is not valid JSON ({exc})", "export the packages again") from None
            if not isinstance(reference, dict) or reference.get("format_version") != REFERENCE_FORMAT:
                raise ArtifactError(f"{candidate} is not a drift reference of format {REFERENCE_FORMAT}",
                                    "export the packages again with this version")
            return check_reference(reference, str(candidate))
    raise ArtifactError(f"no drift reference at {path}", "export the packages (`dimec export RUN_DIR`) after "
                                                         "calibrating; the reference is written at export")


def check_reference(reference: Any, where: str) -> dict[str, Any]:
    """A drift reference whose every field has the type and length the monitor and the servers read (edges
    increasing and finite, one count per bin, counts >= 0); anything else is an ArtifactError naming it."""
    def edge_problem(edges: Any, name: str) -> list[str]:
        if not isinstance(edges, list) or len(edges) > 1000 or not all(_finite(e) for e in edges) or \
                any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            return [f"{name}.edges must be an increasing list of finite numbers"]
        return []

    def get(section: Any, key: str) -> Any:
        return section.get(key) if isinstance(section, dict) else None

    problems = []
    if not isinstance(reference, dict):
        problems.append("not a JSON object")
    else:
        if reference.get("format_version") != REFERENCE_FORMAT:
            problems.append(f"format_version is not {REFERENCE_FORMAT}")
        if not isinstance(reference.get("model"), str) or not reference["model"]:
            problems.append("'model' must be a non-empty string")
        samples = reference.get("samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            problems.append("'samples' must be an integer >= 1")
        anchors = reference.get("anchors")
        try:
            a = np.asarray(anchors, dtype=np.float64)
            if a.ndim != 2 or not len(a) or not np.isfinite(a).all():
                raise ValueError
        except (TypeError, ValueError):
            problems.append("'anchors' must be a non-empty (K, H) list of finite numbers")
        distance, conf = reference.get("routing_distance"), reference.get("confidence")
        for name, section in (("routing_distance", distance), ("confidence", conf)):
            problems += edge_problem(get(section, "edges"), name)
        if not edge_problem(get(distance, "edges"), "") and not _counts(get(distance, "counts"),
                                                                         len(distance["edges"]) + 1):
            problems.append("routing_distance.counts must hold one count >= 0 per bin")
        if not _counts(get(reference.get("routed"), "counts"), len(TIERS)):
            problems.append(f"routed.counts must be {len(TIERS)} counts >= 0")
        counts = get(conf, "counts")
        if not isinstance(counts, dict) or set(counts) - set(EXIT_NAMES):
            problems.append(f"confidence.counts must map exits ({', '.join(EXIT_NAMES)}) to counts")
        elif not edge_problem(conf["edges"], ""):
            problems += [f"confidence.counts.{k} must hold one count >= 0 per bin" for k, c in counts.items()
                         if not _counts(c, len(conf["edges"]) + 1)]
    if problems:
        raise ArtifactError(f"{where} is not a valid drift reference: " + "; ".join(problems[:10]),
                            "export the packages again (`dimec export RUN_DIR`), or give --reference")
    return reference


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _counts(counts: Any, n: int) -> bool:
    return isinstance(counts, list) and len(counts) == n and all(_finite(c) and c >= 0 for c in counts)


# ---- live histograms, on servers and clients -------------------------------------------------------------------
class DriftRecorder:
    """Prometheus histograms/counters of one model's traffic, binned with the reference's edges."""

    def __init__(self, registry, reference: dict[str, Any]) -> None:
        from prometheus_client import Counter, Histogram

        self.reference, self.model = reference, reference["model"]
        self.anchors = np.asarray(reference["anchors"], dtype=np.float64)
        self.distance = Histogram(DISTANCE, "Distance of routing embeddings to the nearest routing centroid",
                                  ["model"], registry=registry,
                                  buckets=(*reference["routing_distance"]["edges"], math.inf))
        self.routed = Counter(ROUTED, "Texts by the tier the routing policy chose", ["model", "tier"],
                              registry=registry)
        self.confidence = Histogram(CONFIDENCE, "Max-probability of the exit that answered", ["model", "exit"],
                                    registry=registry, buckets=(*reference["confidence"]["edges"], math.inf))

    @classmethod
    def for_package(cls, registry, package_dir: str | Path) -> DriftRecorder | None:
        path = Path(package_dir) / DRIFT_REFERENCE
        return cls(registry, read_reference(path)) if path.is_file() else None

    def observe_routing(self, embeddings: np.ndarray, tiers) -> None:
        """(N, H) routing embeddings and the N tiers (names or indices) the policy chose."""
        for d in routing_distances(embeddings, self.anchors):
            self.distance.labels(self.model).observe(float(d))
        for t in tiers:
            self.routed.labels(self.model, t if isinstance(t, str) else TIERS[int(t)]).inc()

    def observe_confidence(self, exit_index: int, probs: np.ndarray) -> None:
        """(N, C) probabilities answered at exit `exit_index` (0 = m, 1 = n, 2 = l)."""
        for c in np.asarray(probs, dtype=np.float64).max(-1):
            self.confidence.labels(self.model, EXIT_NAMES[exit_index]).observe(float(c))


# ---- the monitor ------------------------------------------------------------------------------------------------------
def psi(live: list[float], reference: list[float]) -> float:
    p = np.asarray(live, dtype=np.float64) + 0.5
    q = np.asarray(reference, dtype=np.float64) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float(((p - q) * np.log(p / q)).sum())


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def scrape(url: str, timeout_s: float = 5.0, token: str | None = None) -> dict[tuple[str, str, str], list[float]]:
    """{(family, model, label): counts per bin} of the drift metrics at URL/metrics (bins, not cumulative)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s, headers=_auth(token))
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise DimecError(f"cannot scrape {url}/metrics: {type(exc).__name__}: {exc}",
                         "check the URL (a running edge, cloud or gateway)") from None
    if response.status_code != 200:
        raise DimecError(f"{url}/metrics answered {response.status_code}", "check the URL")
    try:
        return _drift_counts(text_string_to_metric_families(response.text))
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # whatever a non-dimec server or proxy sends
        raise DimecError(f"{url}/metrics is not what a dimec tier exposes ({type(exc).__name__}: "
                         f"{str(exc)[:200]})", "point the monitor at a dimec edge, cloud or gateway") from None


def _drift_counts(families) -> dict[tuple[str, str, str], list[float]]:
    """The drift samples of parsed Prometheus families; a value that is not a count, a tier dimec does not
    know, a missing label or a bucket bound that is not a number is a ValueError/KeyError."""
    out: dict[tuple[str, str, str], list[float]] = {}
    cumulative: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for family in families:
        for s in family.samples:
            if s.name not in (f"{ROUTED}_total", f"{DISTANCE}_bucket", f"{CONFIDENCE}_bucket"):
                continue
            if not (math.isfinite(s.value) and s.value >= 0):
                raise ValueError(f"{s.name} holds {s.value}, not a count")
            model = s.labels.get("model", "")
            if s.name == f"{ROUTED}_total":
                key = (ROUTED, model, "")
                counts = out.setdefault(key, [0.0] * len(TIERS))
                counts[TIERS.index(s.labels["tier"])] += s.value
            else:
                base = s.name[: -len("_bucket")]
                key = (base, model, s.labels.get("exit", ""))
                bound = float(s.labels["le"])
                if math.isnan(bound):
                    raise ValueError(f"{s.name} has the bucket bound le={s.labels['le']!r}")
                cumulative.setdefault(key, []).append((bound, s.value))
    for key, buckets in cumulative.items():
        values = [v for _, v in sorted(buckets)]
        if any(b < a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"{key[0]} buckets are not cumulative")
        out[key] = [values[0], *np.diff(values).tolist()]
    return out


def compare(reference: dict[str, Any], live: dict[tuple[str, str, str], list[float]], threshold: float = 0.25,
            min_samples: int = 100) -> list[dict[str, Any]]:
    """One row per distribution present in `live` for the reference's model: samples, PSI, noise floor,
    verdict ("drift", "ok" or "too few samples")."""
    model, n_ref = reference["model"], reference["samples"]
    expected: dict[tuple[str, str], list[int]] = {(DISTANCE, ""): reference["routing_distance"]["counts"],
                                                  (ROUTED, ""): reference["routed"]["counts"]}
    for name, counts in reference["confidence"]["counts"].items():
        expected[(CONFIDENCE, name)] = counts
    rows = []
    for (family, m, label), counts in sorted(live.items()):
        if m != model or (family, label) not in expected:
            continue
        ref = expected[(family, label)]
        if len(ref) != len(counts):
            raise DimecError(f"{family}{{{label}}} has {len(counts)} bins but the reference has {len(ref)}",
                             "the server runs another export than the reference: give its own --reference")
        n = int(sum(counts))
        value = psi(counts, ref)
        floor = (len(ref) - 1) * (1 / max(1, n) + 1 / max(1, sum(ref) or n_ref))
        verdict = "too few samples" if n < min_samples else ("drift" if value > threshold else "ok")
        rows.append({"distribution": family.removeprefix("dimec_drift_") + (f"[{label}]" if label else ""),
                     "samples": n, "psi": round(value, 4), "noise_floor": round(floor, 4), "verdict": verdict})
    return rows


def monitor(urls: list[str], reference: dict[str, Any] | None = None, threshold: float = 0.25,
            min_samples: int = 100, interval_s: float | None = None, log=print, token: str | None = None) -> int:
    """Scrape, compare, print; returns the exit status: 1 when a distribution drifted, else 0."""
    if not urls:
        raise ConfigError("no URL to monitor", "give the edge, cloud or gateway URL(s)")
    if not (math.isfinite(threshold) and threshold > 0) or min_samples < 1 or \
            (interval_s is not None and not 0 < interval_s <= MAX_INTERVAL_S):
        raise ConfigError(f"--threshold must be a finite number > 0, --min-samples >= 1 and --interval in "
                          f"(0, {MAX_INTERVAL_S:g}] seconds")
    for url in urls:
        _check_url(url)
    reference = reference or fetch_reference(urls, token)
    live = snapshot(urls, token)
    if interval_s:  # only what arrived during the interval
        time.sleep(interval_s)
        live = difference(snapshot(urls, token), live)
    rows = compare(reference, live, threshold, min_samples)
    from dimec.serving.live.http import live_lines

    for line in live_lines(urls):  # live control's loss bound, where a tier serves one (docs/live-control.md)
        log(line)
    if not rows:
        raise DimecError(f"no drift metrics for model {reference['model']} at {', '.join(urls)}",
                         "the servers run another model, or were started without a drift reference "
                         "(export the packages again)")
    log(f"model {reference['model']}: {len(rows)} distribution(s) against {reference['samples']} validation "
        f"samples, PSI threshold {threshold:g}")
    log(f"{'distribution':<24}{'samples':>9}{'PSI':>9}{'noise':>9}  verdict")
    for r in rows:
        log(f"{r['distribution']:<24}{r['samples']:>9}{r['psi']:>9.4f}{r['noise_floor']:>9.4f}  {r['verdict']}")
    drifted = [r for r in rows if r["verdict"] == "drift"]
    if drifted:
        names = ", ".join(f"{r['distribution']} (PSI {r['psi']:.3f})" for r in drifted)
        log(f"DRIFT: {names} past {threshold:g}: the traffic no longer looks like the calibration data; "
            f"re-calibrate on recent traffic or check the sources")
        return 1
    if all(r["verdict"] == "too few samples" for r in rows):
        log(f"no verdict yet: fewer than {min_samples} live samples in every distribution")
    return 0


MAX_INTERVAL_S = 86_400.0  # a day: the monitor sleeps this long at most


def _check_url(url: str) -> None:
    import httpx

    try:
        parsed = httpx.URL(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.host)
        _ = parsed.port  # a port out of range is refused here, not in the middle of a scrape
    except (httpx.InvalidURL, TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{url!r} is not an http:// or https:// URL with a host",
                          "e.g. http://127.0.0.1:8101 (an edge, cloud or gateway)")


def snapshot(urls: list[str], token: str | None = None) -> dict[tuple[str, str, str], list[float]]:
    """The drift counts of all URLs together (a tier's exits are disjoint from the gateway's)."""
    return _merged([scrape(u, token=token) for u in urls])


def difference(after: dict, before: dict) -> dict[tuple[str, str, str], list[float]]:
    """What arrived between two snapshots."""
    return {k: [a - b for a, b in zip(v, before.get(k, [0.0] * len(v)), strict=True)] for k, v in after.items()}


def fetch_reference(urls: list[str], token: str | None = None) -> dict[str, Any]:
    import httpx

    for url in urls:
        try:
            response = httpx.get(f"{url.rstrip('/')}/v1/drift/reference", timeout=5.0, headers=_auth(token))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError):
            continue
        if response.status_code == 200:
            try:
                reference = response.json()
            except (ValueError, RecursionError):
                reference = None
            return check_reference(reference, f"the drift reference served by {url}")
    raise DimecError(f"none of {', '.join(urls)} serves a drift reference",
                     "pass --reference RUN_DIR_or_PACKAGE (written by `dimec export`)")


def _merged(scrapes: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    out: dict[tuple[str, str, str], list[float]] = {}
    for s in scrapes:
        for key, counts in s.items():
            if key in out and len(out[key]) != len(counts):
                raise DimecError(f"{key[0]} has other bins at one of the URLs",
                                 "monitor the tiers of one export together")
            out[key] = [a + b for a, b in zip(out.get(key, [0.0] * len(counts)), counts, strict=True)]
    return out
