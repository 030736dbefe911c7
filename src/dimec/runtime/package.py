"""The tier package format: what each device ships, and how a package is found and checked.

    mobile/  model.int8.onnx (one int8 graph: routing embedding, mobile exit logits, hidden state after layer m),
             router.json, model/ (tokenizer and dimec_model.json; the PyTorch weights only with `--full`),
             model.onnx (fp32, only with `--full`)
    edge/    model/ (layers 1..n, exits m and n, tokenizer)
    cloud/   model/ (all l layers, every exit, tokenizer)

Each holds manifest.json: tier, exit layers, label names, the model's identity (`model_id`, the same for every
package of one export: continuation requests must name it) and every file with its size and sha256, checked
again when a package is loaded, so a tier never serves half-copied or mixed-up weights.

Writing packages is `dimec.serving.deploy.export`; this module only reads and describes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dimec.atomic import write_json
from dimec.errors import ArtifactError, ConfigError
from dimec.rundir import PACKAGES_DIR, ROUTER, RunDir
from dimec.tiers import tier_index

MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
ROUTER_FILE = ROUTER  # the fitted router, copied from the run directory into the mobile package
WEIGHTS_FILE = "model.safetensors"  # inside model/ (dimec.modeling.multi_exit.WEIGHTS)
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}  # backend -> file in the mobile package
FORMAT_VERSION = 2  # 1: no model_id, separate embed.onnx, int8 graph with an fp32 embedding matrix


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


def model_id(model_dir: Path) -> str:
    """The identity of a trained model: sha256 over its folder's file table (names, sizes and sha256 of the
    weights, configs and tokenizer). Every tier package of one export carries it; a tier refuses to continue
    a hidden state computed by another model."""
    table = json.dumps(file_table(Path(model_dir)), sort_keys=True).encode()
    return hashlib.sha256(table).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """(Re)hash every file and write the manifest last, so a manifest always matches its files."""
    manifest = {**manifest, "files": file_table(directory)}
    write_json(directory / MANIFEST, manifest)
    return manifest


def package_bytes(manifest: dict[str, Any]) -> int:
    """Size on disk of a package: the sum of its files (manifest excluded)."""
    return sum(int(f["bytes"]) for f in manifest.get("files", {}).values())


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a tier package (no {MANIFEST})",
                            "create packages with `dimec export RUN_DIR`")
    try:
        manifest = json.loads(path.read_text())
        tier_index(manifest["tier"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ConfigError) as exc:
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


def has_file(directory: Path, name: str) -> bool:
    """Whether a package lists `name` in its manifest (a file the export chose not to ship is absent)."""
    return name in read_manifest(directory, verify=False).get("files", {})


def find_package(path: str | Path, tier: str) -> Path | None:
    """The `tier` package inside a package folder, an export folder or a run directory; None if there is none."""
    path = Path(path)
    tier_index(tier)
    for candidate in (path, path / tier, path / PACKAGES_DIR / tier):
        if (candidate / MANIFEST).is_file():
            found = read_manifest(candidate, verify=False)["tier"]
            if candidate == path and found != tier:
                raise ConfigError(f"{path} is the {found} package, not the {tier} one",
                                  f"give the {tier} package, e.g. {path.parent / tier}")
            if found == tier:
                return candidate
    return None


def resolve_package(path: str | Path, tier: str, backend: str | None = None) -> Path:
    """The `tier` package from a package folder, an export folder or a run directory. Never exports: a run
    directory without packages (or without the file `backend` needs) is an error that says what to run;
    `dimec.serving.deploy.export.ensure_package` exports on request."""
    found = find_package(path, tier)
    if found is None:
        if (Path(path) / MODEL_SUBDIR).is_dir() and RunDir(path).config.is_file():
            raise ArtifactError(f"{path} has no {tier} package yet", f"run `dimec export {path}` first")
        raise ArtifactError(f"{path} is neither a tier package nor a run directory",
                            "give RUN_DIR (with model/ and router.json) or a folder made by `dimec export`")
    missing = backend_file(backend)
    if missing is not None and not has_file(found, missing):
        raise ArtifactError(f"the {tier} package {found} has no {missing} (needed by --backend {backend})",
                            "export with `dimec export RUN_DIR --full` for the fp32 and PyTorch copies, or use "
                            "--backend onnx-int8")
    return found


def backend_file(backend: str | None) -> str | None:
    """The package file a mobile backend loads (None: no particular file)."""
    if backend in ONNX_FILES:
        return ONNX_FILES[backend]
    if backend == "torch":
        return f"{MODEL_SUBDIR}/{WEIGHTS_FILE}"
    return None
