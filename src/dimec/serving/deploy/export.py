"""`dimec export RUN_DIR`: slice the run's model per tier and write the packages (format: package.py).

By default the mobile package is what a phone downloads: one int8 ONNX graph (routing embedding, mobile exit,
hidden state after layer m), the router and the tokenizer. `full=True` adds the fp32 ONNX graph and the
PyTorch weights of layers 1..m; `onnx=False` ships the PyTorch weights instead of any ONNX graph.
The export checks the ONNX graphs against PyTorch (accuracy, routing and decision agreement) and writes the
figures into the manifest (`onnx.check`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from dimec.atomic import atomic_dir
from dimec.errors import ArtifactError
from dimec.rundir import PACKAGES_DIR, RunDir
from dimec.runtime.package import (
    FORMAT_VERSION,
    MODEL_SUBDIR,
    ROUTER_FILE,
    WEIGHTS_FILE,
    backend_file,
    find_package,
    has_file,
    model_id,
    package_bytes,
    write_manifest,
)
from dimec.tiers import TIERS, tier_index


def export_packages(
    run_dir: str | Path,
    out: str | Path | None = None,
    tiers: tuple[str, ...] = TIERS,
    onnx: bool = True,
    full: bool = False,
    check_texts: list[str] | None = None,
    check_pairs: list[str] | None = None,
    check_limit: int = 500,
    log=None,
) -> dict[str, Path]:
    """Write one package per tier into `out` (default RUN_DIR/packages/); each folder is replaced whole."""
    from transformers.utils import logging as hf_logging

    from dimec.modeling.multi_exit import MultiExitModel
    from dimec.serving.ops.monitor import write_reference

    hf_logging.disable_progress_bar()
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PACKAGES_DIR
    if not RunDir(run_dir).model.is_dir():
        raise ArtifactError(f"{run_dir} has no trained model ({MODEL_SUBDIR}/)", "run `dimec train` on it first")
    if "mobile" in tiers and not RunDir(run_dir).router.is_file():
        raise ArtifactError(f"{run_dir} has no {ROUTER_FILE}", "run `dimec calibrate RUN_DIR` first")
    model = MultiExitModel.from_pretrained(RunDir(run_dir).model)
    cfg = model.config
    identity = model_id(RunDir(run_dir).model)
    written: dict[str, Path] = {}
    for tier in tiers:
        index = tier_index(tier)
        sliced = model.slice(index)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "tier": tier, "tier_index": index, "model_id": identity,
            "exit_layers": list(cfg.exit_layers), "exit_layer": cfg.exit_layers[index],
            "label_names": list(cfg.label_names), "max_length": cfg.max_length, "task": cfg.task,
            "source_run": str(run_dir.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with atomic_dir(out / tier) as directory:  # never leaves files of an older export beside the manifest
            sliced.save_pretrained(directory / MODEL_SUBDIR)
            write_reference(run_dir, directory, manifest)  # what the drift monitor compares with (monitor.py)
            if tier == "mobile":
                shutil.copy2(RunDir(run_dir).router, directory / ROUTER_FILE)
                if onnx:
                    _export_mobile_onnx(run_dir, sliced, directory, manifest, full, check_texts, check_pairs,
                                        check_limit, log)
            write_manifest(directory, manifest)
        written[tier] = out / tier
        if log:
            from dimec.runtime.package import read_manifest

            size = package_bytes(read_manifest(out / tier, verify=False))
            log(f"{tier:<6} package: layers 1..{cfg.exit_layers[index]}, {size / 1e6:.1f} MB -> {out / tier}")
    return written


def _export_mobile_onnx(run_dir: Path, sliced, directory: Path, manifest: dict, full: bool, texts, pairs,
                        limit: int, log) -> None:
    """The ONNX graphs, their check against PyTorch, then (unless `full`) the PyTorch weights removed."""
    from dimec.serving.deploy.onnx_export import check_agreement, export_mobile_onnx

    manifest["onnx"] = export_mobile_onnx(sliced, directory, full=full)
    write_manifest(directory, manifest)  # the check loads the package
    texts, pairs, labels, source = check_texts_for(run_dir, texts, pairs, limit, sliced.tokenizer)
    manifest["onnx"]["check"] = check_agreement(sliced, directory, texts, pairs, labels, source)
    if log:
        log(format_check(manifest["onnx"]["check"]))
    if not full:  # a phone ships the int8 graph only; dimec_model.json and the tokenizer stay
        (directory / MODEL_SUBDIR / WEIGHTS_FILE).unlink()
    manifest["contents"] = "int8 ONNX" + (" + fp32 ONNX + PyTorch weights" if full else "")


def ensure_package(path: str | Path, tier: str, backend: str | None = None, log=None) -> Path:
    """The `tier` package of `path`, exporting it first (and saying so) when `path` is a run directory
    without one: what `dimec serve/client/serve-all/profile RUN_DIR` do. `resolve_package` never exports."""
    from dimec.runtime.package import resolve_package

    found = find_package(path, tier)
    needed = backend_file(backend)
    run = RunDir(path)
    if (found is None or (needed and not has_file(found, needed))) and run.model.is_dir() and run.config.is_file():
        full = backend in ("onnx", "torch") and tier == "mobile"
        if log:
            log(f"dimec: no {tier} package for backend {backend or 'torch'} in {path}: exporting it now "
                f"(`dimec export {path}{' --full' if full else ''}`; takes a while once)")
        export_packages(path, tiers=(tier,), onnx=tier == "mobile", full=full, log=log)
    return resolve_package(path, tier, backend)


def check_texts_for(run_dir: Path, texts, pairs, limit: int, tokenizer):
    """Texts for the ONNX agreement check (and profiling): given ones, else the run's validation split, else
    random vocabulary tokens (still a numeric check, said so in the manifest)."""
    if texts:
        return list(texts)[:limit], (list(pairs)[:limit] if pairs else None), None, "given texts"
    try:
        from dimec.pipeline import load_saved_config, task_data

        data = task_data(load_saved_config(run_dir))
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
    lines = [f"ONNX check on {check['samples']} texts ({check['source']}), router {check['router']}:"]
    for name in ("onnx_fp32", "onnx_int8"):
        if name not in check:
            continue
        c = check[name]
        acc = f", accuracy {c['accuracy']:.4f} vs torch {check['torch_accuracy']:.4f}" if "accuracy" in c else ""
        lines.append(f"  {name}: label agreement {c['agreement']:.4f}, max |logit diff| {c['max_logit_diff']:.4g}, "
                     f"routing agreement {c['route_agreement']:.4f}, decision agreement "
                     f"{c['decision_agreement']:.4f}{acc}")
    return "\n".join(lines)
