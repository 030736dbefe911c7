"""Tier packages: what each device ships, written by `dimec export RUN_DIR`.

    OUT/mobile/  model/ (embeddings, layers 1..m, exit m, tokenizer), router.json,
                 model.onnx, model.int8.onnx (logits + routing embedding), embed.onnx (routing embedding)
    OUT/edge/    model/ (layers 1..n, exits m and n, tokenizer)
    OUT/cloud/   model/ (all l layers, every exit, tokenizer)

Each holds manifest.json: tier, exit layers, label names and every file with its size and sha256, checked
again when a package is loaded, so a tier never serves half-copied or mixed-up weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from dimec.atomic import atomic_dir, write_json
from dimec.errors import ArtifactError, ConfigError
from dimec.rundir import PACKAGES_DIR, ROUTER
from dimec.tiers import TIERS, tier_index

MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
ROUTER_FILE = ROUTER  # the fitted router, copied from the run directory into the mobile package
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """(Re)hash every file and write the manifest last, so a manifest always matches its files."""
    manifest = {**manifest, "files": file_table(directory)}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a tier package (no {MANIFEST})",
                            "create packages with `dimec export RUN_DIR`")
    try:
        manifest = json.loads(path.read_text())
        tier_index(manifest["tier"])
    except (json.JSONDecodeError, KeyError, ConfigError) as exc:
        raise ArtifactError(f"{path} is not a valid manifest ({exc})", "export the package again") from None
    if verify:
        for name, entry in manifest.get("files", {}).items():
            f = directory / name
            if not f.is_file():
                raise ArtifactError(f"package {directory} lacks {name}", "export the package again")
            if f.stat().st_size != entry["bytes"] or sha256(f) != entry["sha256"]:
                raise ArtifactError(f"{f} does not match its manifest (size or sha256)",
                                    "the package was modified or half-copied: export it again")
    return manifest


def resolve_package(path: str | Path, tier: str, onnx: bool = False) -> Path:
    """A tier package from a package folder, an export folder or a run directory (exported on first use)."""
    path = Path(path)
    tier_index(tier)
    if (path / MANIFEST).is_file():
        found = read_manifest(path, verify=False)["tier"]
        if found != tier:
            raise ConfigError(f"{path} is the {found} package, not the {tier} one",
                              f"give the {tier} package, e.g. {path.parent / tier}")
        return path
    if (path / tier / MANIFEST).is_file():  # an export folder (`dimec export --out DIR`)
        return resolve_package(path / tier, tier, onnx)
    candidate = path / PACKAGES_DIR / tier
    if (candidate / MANIFEST).is_file() and (not onnx or (candidate / "model.int8.onnx").is_file()):
        return candidate
    if (path / MODEL_SUBDIR).is_dir() and (path / "config.json").is_file():
        export_packages(path, tiers=(tier,), onnx=onnx)
        return candidate
    raise ArtifactError(f"{path} is neither a tier package nor a run directory",
                        "give RUN_DIR (with model/ and router.json) or a folder made by `dimec export`")


def export_packages(
    run_dir: str | Path,
    out: str | Path | None = None,
    tiers: tuple[str, ...] = TIERS,
    onnx: bool = True,
    check_texts: list[str] | None = None,
    check_pairs: list[str] | None = None,
    check_limit: int = 500,
    log=None,
) -> dict[str, Path]:
    """Slice the run's model per tier and write the packages; the mobile one also as ONNX fp32/int8."""
    from transformers.utils import logging as hf_logging

    from dimec.modeling.multi_exit import MultiExitModel
    from dimec.serving.monitor import write_reference

    hf_logging.disable_progress_bar()
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PACKAGES_DIR
    if not (run_dir / MODEL_SUBDIR).is_dir():
        raise ArtifactError(f"{run_dir} has no trained model ({MODEL_SUBDIR}/)", "run `dimec train` on it first")
    if "mobile" in tiers and not (run_dir / ROUTER_FILE).is_file():
        raise ArtifactError(f"{run_dir} has no {ROUTER_FILE}", "run `dimec calibrate RUN_DIR` first")
    model = MultiExitModel.from_pretrained(run_dir / MODEL_SUBDIR)
    cfg = model.config
    written: dict[str, Path] = {}
    for tier in tiers:
        index = tier_index(tier)
        # built in a temporary folder that replaces out/tier in one swap: a crash or a failed check never
        # leaves a half-written package, nor files of an older export beside the new manifest
        with atomic_dir(out / tier) as directory:
            model.slice(index).save_pretrained(directory / MODEL_SUBDIR)
            manifest: dict[str, Any] = {
                "format_version": FORMAT_VERSION, "tier": tier, "tier_index": index,
                "exit_layers": list(cfg.exit_layers), "exit_layer": cfg.exit_layers[index],
                "label_names": list(cfg.label_names), "max_length": cfg.max_length, "task": cfg.task,
                "source_run": str(run_dir.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_reference(run_dir, directory, manifest)  # what the drift monitor compares with (monitor.py)
            if tier == "mobile":
                shutil.copy2(run_dir / ROUTER_FILE, directory / ROUTER_FILE)
                write_manifest(directory, manifest)  # the check below loads the package
                if onnx:
                    from dimec.serving.onnx_export import check_agreement, export_mobile_onnx

                    manifest["onnx"] = export_mobile_onnx(directory)
                    texts, pairs, labels, source = check_texts_for(run_dir, check_texts, check_pairs,
                                                                   check_limit, model.tokenizer)
                    manifest["onnx"]["check"] = check_agreement(directory, texts, pairs, labels, source)
                    if log:
                        log(format_check(manifest["onnx"]["check"]))
            write_manifest(directory, manifest)
        directory = written[tier] = out / tier
        if log:
            size = sum(f["bytes"] for f in read_manifest(directory, verify=False)["files"].values())
            log(f"{tier:<6} package: layers 1..{cfg.exit_layers[index]}, {size / 1e6:.1f} MB -> {directory}")
    return written


def check_texts_for(run_dir: Path, texts, pairs, limit: int, tokenizer):
    """Texts for the ONNX agreement check: given ones, else the run's validation split, else random
    vocabulary tokens (still a numeric check, said so in the manifest)."""
    if texts:
        return list(texts)[:limit], (list(pairs)[:limit] if pairs else None), None, "given texts"
    try:
        from dimec.pipeline import load_run_config, task_data

        data = task_data(load_run_config(run_dir))
        val = data.validation[:limit]
        pairs = [e.text_pair for e in val] if val and val[0].text_pair is not None else None
        return [e.text for e in val], pairs, [e.label for e in val], "validation split"
    except Exception as exc:  # noqa: BLE001  (the data may be gone or need a network; the check still runs)
        import random

        rng = random.Random(0)
        vocab = [t for t in tokenizer.get_vocab() if t.isalpha()] or ["a"]
        texts = [" ".join(rng.choices(vocab, k=rng.randint(3, 30))) for _ in range(min(limit, 200))]
        return texts, None, None, f"random vocabulary tokens (validation split unavailable: {exc})"


def format_check(check: dict[str, Any]) -> str:
    lines = [f"ONNX check on {check['samples']} texts ({check['source']}):"]
    for name in ("onnx_fp32", "onnx_int8"):
        c = check[name]
        acc = f", accuracy {c['accuracy']:.4f} vs torch {check['torch_accuracy']:.4f}" if "accuracy" in c else ""
        lines.append(f"  {name}: agreement {c['agreement']:.4f}, max |logit diff| {c['max_logit_diff']:.4g}, "
                     f"route agreement {c['route_agreement']:.4f}{acc}")
    return "\n".join(lines)
