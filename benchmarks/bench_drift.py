"""Live control under drift (issue 18): shadow answers, the live bound, and the controller, over loopback.

A copy of the run (never the run itself) is re-calibrated for the promise measured live (default: at most
`--max-loss` points of disagreement with the cloud with probability >= 1 - `--delta`, Learn-then-Test), which records the calibrated path in its router.json;
its packages are exported and served as three tiers over loopback (edge and cloud uvicorn servers in threads
of this process, the mobile client here). One stream of `4 x --texts` texts in four phases:

    in-domain   held-out texts of the run's task (its test split, then validation texts for the rest)
    other task  SST-2 sentences (/work/shared/glue/SST-2): the same label space, another distribution
    noisy       in-domain texts with character noise (`--noise` per character: typos, case, dropped spaces; seeded)
    hard shift  a stress phase: in-domain texts where `--hard-share` of the traffic comes from held-out texts on
                which the mobile or edge exit is confident and disagrees with the cloud (chosen with the cloud's
                answers, which no real drift knows; drawn with replacement). The three natural phases above make
                the exits less confident, so the policy defers more (docs/live-control.md): this phase is the
                drift they do not produce, the one the controller exists for

is sent twice, in batches of `--batch`: uncontrolled (the calibrated policy, no shadows) and controlled
(shadow.rate `--shadow-rate`, the controller on, the client polling GET /v1/policy after each batch). The cloud
answers every text offline first: the truth each answer is compared with. Per phase: live disagreement and
accuracy loss after the warm-up (`--warmup` texts), time to react (texts from the phase change to the first
policy change, until the bound's lower end first passes the step's budget, and until the disagreement over the
rest of the phase is back within eps), shadow share and
cost (cost model units), and lost answers.

    python benchmarks/bench_drift.py [RUN_DIR] [--texts 2000] [--shadow-rate 0.1] [--max-loss 3] [--quick]

Writes benchmarks/results/drift.json and drift.png (`--name` another stem, for a second setting beside the
first); BENCHMARKS.md renders its section (`render(results)`).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, save, trained_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/bench_drift.py RUN_DIR"
TITLE = "Live control under drift: shadow answers, live bound, controller (issue 18)"
TOKEN = "bench-drift-token"
PHASES = ("in-domain", "other task (SST-2)", "noisy in-domain", "hard shift (stress)")


# ---- the stream ------------------------------------------------------------------------------------------------------
def noisy(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Character noise: per character, with probability `rate`, a typo (neighbour swap, drop, double, random
    letter), a case flip, or a dropped space."""
    out, chars, i = [], list(text), 0
    while i < len(chars):
        c = chars[i]
        if rng.random() < rate:
            kind = rng.choice(("swap", "drop", "double", "letter", "case", "space"))
            if kind == "swap" and i + 1 < len(chars):
                out += [chars[i + 1], c]
                i += 2
                continue
            if kind == "drop" or (kind == "space" and c == " "):
                i += 1
                continue
            out.append({"double": c + c, "letter": rng.choice("abcdefghijklmnopqrstuvwxyz"),
                        "case": c.swapcase()}.get(kind, c))
        else:
            out.append(c)
        i += 1
    return "".join(out) or text


def sst2(n: int, seed: int) -> tuple[list[str], list[int]]:
    glue = ROOT.parent / "shared" / "glue"
    glue = glue if glue.is_dir() else Path("/work/shared/glue")
    rows = []
    for split in ("dev", "train"):
        with (glue / "SST-2" / f"{split}.tsv").open(newline="") as f:
            rows += [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                     if len(r["sentence"].split()) >= 4]  # sentences, not the train split's short phrases
        if len(rows) >= 4 * n:
            break
    random.Random(seed).shuffle(rows)
    return [t for t, _ in rows[:n]], [y for _, y in rows[:n]]


def hard_texts(copy: Path, min_confidence: float = 0.8) -> list[tuple[str, int]]:
    """Held-out texts (test, validation and the training rows the cap dropped) on which the mobile or the edge
    exit is confident (max-probability >= min_confidence at the deployed temperatures) and disagrees with the
    cloud exit: read from the calibrated copy's cached outputs."""
    from dimec.pipeline import load_saved_config, spare_outputs, split_outputs, task_data

    cfg = load_saved_config(copy)
    data = task_data(cfg)
    hard = []
    for examples, outputs in ((data.test, split_outputs(copy, "test")),
                              (data.validation, split_outputs(copy, "validation")),
                              (data.spare, spare_outputs(copy, cfg, data) if data.spare else None)):
        if outputs is None:
            continue
        pred, conf = outputs.predictions, outputs.probs.max(-1)  # (N, 3), (N, 3)
        wrong = ((pred[:, :2] != pred[:, 2:]) & (conf[:, :2] >= min_confidence)).any(1)  # (N,)
        hard += [(examples[i].text, examples[i].label) for i in np.flatnonzero(wrong)]
    return hard


def make_stream(run_dir: Path, n: int, seed: int, noise: float = 0.1, hard: list[tuple[str, int]] = (),
                hard_share: float = 0.2) -> tuple[list[str], list[int], list[int]]:
    """(texts, gold labels, phase index) of the four phases, n texts each."""
    from dimec.pipeline import load_saved_config, task_data

    data = task_data(load_saved_config(run_dir))
    held = [(e.text, e.label) for e in data.test] + [(e.text, e.label) for e in data.validation]
    rng = random.Random(seed)
    first = held[:n] if n <= len(data.test) else held[:len(data.test)] + rng.sample(held[len(data.test):], n - len(data.test))
    other = sst2(n, seed)
    third = [(noisy(t, rng, noise), y) for t, y in rng.sample(held, min(n, len(held)))]
    third += third[: n - len(third)]
    fourth = [rng.choice(hard) if hard and rng.random() < hard_share else rng.choice(held) for _ in range(n)]
    texts = [t for t, _ in first] + other[0] + [t for t, _ in third] + [t for t, _ in fourth]
    labels = [y for _, y in first] + other[1] + [y for _, y in third] + [y for _, y in fourth]
    phase = [p for p in range(len(PHASES)) for _ in range(n)]
    return texts, labels, phase


# ---- set-up -----------------------------------------------------------------------------------------------------------
def prepare(run_dir: Path, work: Path, max_loss: float, loss: str, delta: float | None,
            log=print) -> tuple[Path, dict]:
    """A copy of the run, calibrated for the live promise (the path recorded), and its packages."""
    from dimec.config import RunConfig, apply_overrides
    from dimec.pipeline import calibrate_stage, load_saved_config
    from dimec.serving.deploy.export import export_packages

    copy = work / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("packages", "checkpoint", "dynamics_plots"))
    cfg = load_saved_config(copy)
    cfg = RunConfig.from_dict(apply_overrides(cfg.to_dict(), [f"calibration.loss={loss}", f"calibration.max_loss={max_loss}",
                                                               f"calibration.delta={'null' if delta is None else delta}",
                                                               "calibration.budget=null",
                                                               "calibration.budget_cut=null"]))
    log(f"calibrating the copy for <= {max_loss:g} pt of {loss}" + (f" with probability >= {1 - delta:g}" if delta else "")
        + " ...")
    calibrate_stage(copy, cfg)
    packages = export_packages(copy, work / "packages", onnx=False, log=lambda *_: None)
    return copy, packages


def price(answer, plans: dict, cost_model, exit_layers: list[int]) -> float:
    """What an answer cost under the cost model: its plan, stopped where it was answered."""
    from dimec.routing.plan import stage_costs
    from dimec.tiers import TIERS

    plan = plans.get(answer.plan)
    tier = TIERS.index(answer.tier)
    if plan is None:
        return float(cost_model.tier_costs[tier])
    for k, s in enumerate(plan):
        if s.tier == tier and exit_layers[s.exit] == answer.exit_layer:
            return float(stage_costs(plan, cost_model)[k])
    return float(stage_costs(plan, cost_model)[-1])


def stream(copy: Path, packages: dict, models: dict, texts: list[str], controlled: bool, args) -> dict:
    """Send the stream through three tiers over loopback; per text: answer, tier, cost, policy version."""
    from dimec.atomic import read_json
    from dimec.costs import CostModel
    from dimec.routing.plan import Stage, check_plan, plan_text
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.live.controller import LiveControl, LiveSettings
    from dimec.serving.live.http import PolicyFollower, ShadowSender, apply_policy
    from dimec.serving.phone.client import MobileClient
    from dimec.serving.phone.remote import HttpRemote, Timeouts
    from dimec.serving.servers.server import create_app

    router_file = copy / "router.json"
    pristine = router_file.read_text()
    raw = read_json(router_file, "")
    cost_model = CostModel.from_dict(raw["cost_model"])
    settings = LiveSettings(shadow_rate=args.shadow_rate if controlled else 0.0, patience=args.patience,
                            enabled=controlled)
    live = LiveControl.from_router_file(router_file, len(models["cloud"].label_names), settings) if controlled else None
    cloud = ThreadServer(create_app(None, "cloud", TOKEN, model=models["cloud"], live=live)).start()
    forward = HttpRemote("cloud", cloud.url, TOKEN, Timeouts(connect_s=2, read_s=60))  # plans going on to the cloud
    edge = ThreadServer(create_app(None, "edge", TOKEN, model=models["edge"], forward=forward)).start()
    client = MobileClient(models["mobile"], edge.url, cloud.url, TOKEN, Timeouts(connect_s=2, read_s=60))
    exit_layers = list(models["mobile"].exit_layers)
    plans = {}
    for entry in raw["state"]["path"] or [{"state": raw["state"]}]:
        for p in entry["state"]["plans"]:
            plan = check_plan(tuple(Stage.from_list(s) for s in p))
            plans[plan_text(plan)] = plan
    for t in range(3):
        plans[plan_text((Stage(t, t),))] = (Stage(t, t),)
    follower = None
    if controlled:
        client.live = ShadowSender(cloud.url, TOKEN, settings, seed=args.seed, cloud_exit_layer=exit_layers[2])
        follower = PolicyFollower(cloud.url, TOKEN, lambda p: apply_policy(client, p))
        follower.poll()
    out = {"label": [], "tier": [], "cost": [], "version": [], "step": [], "shadowed": [], "degraded": 0,
           "latency_ms": []}
    trace = []
    try:
        for start in range(0, len(texts), args.batch):
            batch = texts[start:start + args.batch]
            t0 = time.perf_counter()
            answers = client.classify(batch, ids=[f"x{start + i}" for i in range(len(batch))])
            out["latency_ms"].append((time.perf_counter() - t0) * 1e3 / len(batch))
            step = live.controller.step if live else len(raw["state"]["path"]) - 1
            version = live.controller.version if live else 1
            for a in answers:
                out["label"].append(a.label_id)
                out["tier"].append(a.tier)
                out["cost"].append(price(a, plans, cost_model, exit_layers))
                out["version"].append(version)
                out["step"].append(step)
                out["shadowed"].append("shadowed" in a.flags)
                out["degraded"] += a.degraded
            if controlled:
                client.live.flush(timeout_s=30)  # the benchmark's clock: the bound after each batch
                follower.poll()
                ev = live.status()["evidence"]["disagreement"]
                trace.append({"text": start + len(batch), "step": live.controller.step,
                              "budget": live.controller.steps[live.controller.step].budget,
                              "version": live.controller.version, "n": ev["n"], "estimate": ev["estimate"],
                              "low": ev["low"], "high": ev["high"]})
        if controlled:
            status = live.status()
            out |= {"history": live.controller.history, "shadow": client.live.stats(), "counts": status["counts"],
                    "shadow_cost": status["shadow_cost"], "feedback": status["feedback"],
                    "path": [{k: s[k] for k in ("describe", "val_disagreement_pt", "val_accuracy_loss_pt", "val_cost",
                                                "budget")} for s in status["path"]]}
    finally:
        client.close()
        if follower is not None:
            follower.close()
        edge.stop()
        forward.close()
        cloud.stop()
        router_file.write_text(pristine)  # the next pass starts from the calibrated policy again
    out["trace"] = trace
    out["answered"] = len(out["label"])
    return out


# ---- figures -----------------------------------------------------------------------------------------------------------
def phase_figures(run: dict, truth: np.ndarray, gold: np.ndarray, phase: np.ndarray, eps: float, warmup: int,
                  cloud_only_cost: float) -> list[dict]:
    label = np.asarray(run["label"])
    dis = (label != truth).astype(float)
    acc_loss = (truth == gold).astype(float) - (label == gold).astype(float)
    cost = np.asarray(run["cost"])
    version = np.asarray(run["version"])
    shadowed = np.asarray(run["shadowed"], dtype=bool)
    rows = []
    for p in range(len(PHASES)):
        idx = np.flatnonzero(phase == p)
        after = idx[min(warmup, len(idx) // 2):]
        changes = np.flatnonzero(np.diff(version[idx]) != 0)
        first_change = int(changes[0] + 1) if len(changes) else None
        suffix = np.cumsum(dis[idx][::-1])[::-1] / np.arange(len(idx), 0, -1)  # mean over [t, end of phase)
        ok = np.flatnonzero(suffix <= eps)
        start, end = int(idx[0]), int(idx[-1]) + 1
        crossed = [t["text"] - start for t in run.get("trace", []) if start < t["text"] <= end and t["n"]
                   and t["low"] > t["budget"]]
        rows.append({"phase": PHASES[p], "texts": len(idx),
                     "bound_crosses_after_texts": crossed[0] if crossed else None,
                     "disagreement_pt": 100 * float(dis[idx].mean()),
                     "disagreement_after_warmup_pt": 100 * float(dis[after].mean()),
                     "accuracy_loss_pt": 100 * float(acc_loss[idx].mean()),
                     "accuracy_loss_after_warmup_pt": 100 * float(acc_loss[after].mean()),
                     "policy_changes": len(changes), "first_change_after_texts": first_change,
                     "within_eps_from_text": int(ok[0]) if len(ok) else None,
                     "mean_cost": float(cost[idx].mean()),
                     "cost_change_pct": 100 * (float(cost[idx].mean()) / cloud_only_cost - 1),
                     "shadow_share": float(shadowed[idx].mean())})
    return rows


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    n = data["texts_per_phase"]
    w = max(50, n // 10)
    for name, style in (("uncontrolled", "C3"), ("controlled", "C0")):
        dis = np.asarray(data["disagreement_per_text"][name], dtype=float)
        roll = np.convolve(dis, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(dis) + 1), 100 * roll, style, ls="--" if name == "uncontrolled" else "-",
                label=f"{name}: disagreement ({w}-text window)")
    tr = data["controlled"]["trace"]
    x = [t["text"] for t in tr]
    ax.fill_between(x, [100 * t["low"] for t in tr], [100 * t["high"] for t in tr], color="C0", alpha=0.15,
                    label="live confidence sequence (current version)")
    ax.axhline(100 * data["eps"], color="k", ls="--", lw=1, label=f"eps = {100 * data['eps']:g} pt")
    for p in range(1, len(PHASES)):
        ax.axvline(p * n, color="grey", lw=1)
    ax.set_ylim(0, max(5 * 100 * data["eps"], 1))
    ax.set_xlabel("texts in the stream (phases: in-domain | SST-2 | noisy | hard shift)")
    ax.set_ylabel("disagreement with the cloud (%)")
    ax2 = ax.twinx()
    ax2.step(x, [t["step"] for t in tr], "C2", where="post", label="policy step (0 = cloud-only)")
    ax2.set_ylabel("path step")
    ax2.set_ylim(-0.5, max(1, len(data["controlled"]["path"]) - 0.5))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def natural_drift(data: dict) -> str:
    """What the natural phases did to the uncontrolled policy: disagreement and cost against in-domain."""
    u = data["uncontrolled"]["phases"]
    parts = [f"{p['phase']} {p['disagreement_after_warmup_pt']:.2f} pt at {p['cost_change_pct']:+.1f}% cost"
             for p in u[1:3]]
    return (f"The natural drifts against in-domain ({u[0]['disagreement_after_warmup_pt']:.2f} pt at "
            f"{u[0]['cost_change_pct']:+.1f}% cost), uncontrolled: {'; '.join(parts)}. Where the exits grow less "
            "confident on the new texts, the cascade sends more of them on, and the loss falls as the cost rises.")


def render(data: dict) -> str:
    eps = 100 * data["eps"]
    rows = []
    for u, c in zip(data["uncontrolled"]["phases"], data["controlled"]["phases"], strict=True):
        rows.append([u["phase"], f"{u['disagreement_after_warmup_pt']:.2f}", f"{c['disagreement_after_warmup_pt']:.2f}",
                     f"{u['accuracy_loss_after_warmup_pt']:+.2f}", f"{c['accuracy_loss_after_warmup_pt']:+.2f}",
                     c["policy_changes"],
                     c["bound_crosses_after_texts"] if c["bound_crosses_after_texts"] is not None else "-",
                     c["first_change_after_texts"] if c["first_change_after_texts"] is not None else "-",
                     c["within_eps_from_text"] if c["within_eps_from_text"] is not None else "never",
                     f"{u['cost_change_pct']:+.1f}%", f"{c['cost_change_pct']:+.1f}%"])
    table = markdown_table(["phase", "dis. uncontrolled (pt)", "dis. controlled (pt)", "acc. loss unc.",
                            "acc. loss ctl.", "changes", "bound past budget (texts)", "first change (texts)",
                            "within eps from text",
                            "cost unc.", "cost ctl."], rows)
    c = data["controlled"]
    path = "\n".join(f"{k}. {s['describe']} (validation disagreement {s['val_disagreement_pt']:.2f} pt, "
                     f"cost {s['val_cost']:.4f})" for k, s in enumerate(c["path"]))
    t = data["targets"]
    return f"""Run: {data['run']}. Promise: at most {eps:g} pt of {data['loss']} ({data['calibration']}).
Stream: {data['texts_per_phase']:,} texts per phase, batches of {data['batch']}, shadow.rate {data['shadow_rate']:g}
(seed {data['seed']}), controller patience {data['patience']}; figures after a warm-up of {data['warmup']} texts per
phase; the truth is the cloud's answer on every text, computed offline. Noise rate {data['noise']:g} per character;
the stress phase draws {100 * data.get('hard_share', 0):g}% of its texts from {data.get('hard_texts', 0)} hard held-out
texts (a cheap exit confident and disagreeing with the cloud), the rest in-domain.

{table}

Shadowed texts: {c['counts']['shadowed']:,} sent to the cloud + {c['counts']['free']:,} answered there already
(share {data['shadow_share']:.3f}), costing {data['shadow_cost']:.2f} cost units ({data['shadow_cost_pct']:.1f}% of the
controlled stream's serving cost). Controller's extra cost over the uncontrolled policy (shadows and safer steps):
{data['extra_cost_pct']:+.1f}% of the uncontrolled cost. Lost answers: {data['lost']} (degraded: {data['degraded']}).

Targets: controlled within eps + 0.5 pt after warm-up in every phase: **{t['controlled_within']}**; uncontrolled
beyond it in at least one phase: **{t['uncontrolled_beyond']}**; no policy change in the in-domain phase:
**{t['no_change_in_domain']}**.

{natural_drift(data)}

The calibrated path (safest first; the controller starts at the last step):

{path}

![live disagreement, bound and policy step](benchmarks/results/{data.get('name', 'drift')}.png)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="/work/main/runs/default")
    parser.add_argument("--texts", type=int, default=2000, help="texts per phase")
    parser.add_argument("--shadow-rate", type=float, default=0.1)
    parser.add_argument("--max-loss", type=float, default=3.0, help="the promise, in points of --loss")
    parser.add_argument("--loss", default="disagreement", choices=("disagreement", "accuracy"))
    parser.add_argument("--delta", type=float, default=0.1,
                        help="calibrate with Learn-then-Test at this level (0: the point estimate, which on this "
                             "run already breaks its promise on in-domain test texts)")
    parser.add_argument("--patience", type=int, default=150, help="quiet shadow answers before a step back")
    parser.add_argument("--warmup", type=int, default=1000, help="texts per phase before figures count")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.1, help="per-character noise rate of the third phase")
    parser.add_argument("--hard-share", type=float, default=0.2,
                        help="share of the stress phase drawn from the hard texts (the rest: in-domain)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 150 texts per phase, results not saved")
    parser.add_argument("--render", action="store_true", help="only print the section from drift.json")
    parser.add_argument("--name", default="drift", help="results stem: benchmarks/results/NAME.json and NAME.png")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads((RESULTS / "drift.json").read_text())["data"]))
        return 0
    if args.quick:
        args.texts, args.warmup = 150, 50
    run_dir = Path(args.run_dir)
    if not trained_run(run_dir):
        return 2
    import torch

    from dimec.runtime.tier import TierModel

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="dimec-drift-"))
    try:
        copy, packages = prepare(run_dir, work, args.max_loss, args.loss, args.delta or None)
        models = {"edge": TierModel(packages["edge"]), "cloud": TierModel(packages["cloud"]),
                  "mobile": TierModel(packages["mobile"], "torch")}
        hard = hard_texts(copy)
        print(f"{len(hard)} hard held-out texts (a cheap exit confident and disagreeing with the cloud)")
        texts, gold, phase = make_stream(run_dir, args.texts, args.seed, args.noise, hard, args.hard_share)
        print(f"{len(texts)} texts; the cloud answers all of them offline ...")
        truth = np.concatenate([models["cloud"].classify(texts[i:i + 64]).label_ids for i in range(0, len(texts), 64)])
        runs = {}
        for name, controlled in (("uncontrolled", False), ("controlled", True)):
            print(f"{name} stream ...")
            t0 = time.perf_counter()
            runs[name] = stream(copy, packages, models, texts, controlled, args)
            print(f"  {time.perf_counter() - t0:.0f} s")
        raw = json.loads((copy / "router.json").read_text())
        from dimec.costs import CostModel

        cloud_only = CostModel.from_dict(raw["cost_model"]).cloud_only
        eps = args.max_loss / 100
        gold, phase = np.asarray(gold), np.asarray(phase)
        for r in runs.values():
            r["phases"] = phase_figures(r, truth, gold, phase, eps, args.warmup, cloud_only)
        ctl, unc = runs["controlled"], runs["uncontrolled"]
        serving_cost = float(np.sum(ctl["cost"]))
        extra = serving_cost + ctl["shadow_cost"] - float(np.sum(unc["cost"]))
        limit = 100 * eps + 0.5
        data_json = json.loads((run_dir / "data.json").read_text())
        data = {
            "run": f"{data_json['task']} ({run_dir.name}), exits {list(models['mobile'].exit_layers)}",
            "calibration": raw["report"]["how"] if "report" in raw else "",
            "eps": eps, "loss": args.loss, "delta": args.delta, "texts_per_phase": args.texts, "batch": args.batch,
            "shadow_rate": args.shadow_rate, "seed": args.seed, "noise": args.noise, "patience": args.patience, "warmup": args.warmup,
            "hard_share": args.hard_share, "hard_texts": len(hard), "name": args.name,
            "shadow_share": (ctl["counts"]["shadowed"] + ctl["counts"]["free"]) / len(texts),
            "shadow_cost": ctl["shadow_cost"], "shadow_cost_pct": 100 * ctl["shadow_cost"] / serving_cost,
            "extra_cost_pct": 100 * extra / float(np.sum(unc["cost"])),
            "lost": 2 * len(texts) - unc["answered"] - ctl["answered"], "degraded": unc["degraded"] + ctl["degraded"],
            "targets": {
                "controlled_within": all(p["disagreement_after_warmup_pt"] <= limit for p in ctl["phases"]),
                "uncontrolled_beyond": any(p["disagreement_after_warmup_pt"] > limit for p in unc["phases"]),
                "no_change_in_domain": ctl["phases"][0]["policy_changes"] == 0},
            "uncontrolled": {"phases": unc["phases"]},
            "controlled": {k: ctl[k] for k in ("phases", "history", "shadow", "counts", "trace", "path")},
            "disagreement_per_text": {k: (np.asarray(r["label"]) != truth).astype(int).tolist() for k, r in runs.items()},
        }
        print(render(data))
        if args.quick:
            plot(data, work / "drift.png")
            print(f"quick run: results not saved (plot in {work / 'drift.png'})")
            return 0
        plot(data, RESULTS / f"{args.name}.png")
        cmd = (f"{COMMAND.replace('RUN_DIR', str(run_dir))} --texts {args.texts} --shadow-rate {args.shadow_rate:g} "
               f"--max-loss {args.max_loss:g} --loss {args.loss} --delta {args.delta:g} --patience {args.patience} "
               f"--noise {args.noise:g} --hard-share {args.hard_share:g}")
        if args.name != "drift":
            cmd += f" --name {args.name}"
        title = TITLE if args.name == "drift" else f"{TITLE}, shadow.rate {args.shadow_rate:g}"
        save(args.name, title, cmd, "bench_drift.py", data)
        return 0
    finally:
        if not args.quick:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
