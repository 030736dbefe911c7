"""The wire format of continuation requests: a hidden state shipped from one tier to the next.

A body is one safetensors file (a JSON header, then raw little-endian tensors; nothing is executed or
unpickled when it is read), sent as `Content-Type: application/vnd.dimec.hidden+safetensors`:

    tensors   hidden           (B, T, H) float16 (float32 accepted)   the hidden state after layer `layer`
              attention_mask   (B, T) uint8 (int8/bool accepted)     1 = real token; every row has at least one
    metadata  dimec            "1"                                    wire format version
              model            the model's identity (manifest `model_id`, sha256 hex) the state comes from
              layer            "k": how many transformer layers produced the state (0 = the embedding layer)
              ids              JSON list of B request ids (validate.ID_RULE: 1..128 visible ASCII, unique)
              plan             JSON list of the stages still to run, the first on the receiving tier:
                               [{"tier": "edge", "exit": 1, "threshold": 0.8}, {"tier": "cloud", "exit": 2,
                               "threshold": null}]; absent: answer at the receiving tier's own exit
              confidence       "max_prob" or "entropy": what the thresholds read (default max_prob)

fp16 halves the bytes of fp32 (B * T * H * 2 bytes for the state); rows are padded to the longest sample of
the request. `decode` checks everything a body alone can say (format, names, dtypes, shapes, finite values,
ids, plan syntax); the receiving tier checks the rest against its model (identity, hidden size, length, k).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

import numpy as np

from dimec.errors import ConfigError
from dimec.runtime.plans import CONFIDENCES, Plan, Stage, check_plan
from dimec.runtime.validate import finite_number, ids_problem, natural
from dimec.tiers import TIERS

CONTENT_TYPE = "application/vnd.dimec.hidden+safetensors"
WIRE_VERSION = "1"
HIDDEN_DTYPES = {"F16": np.float16, "F32": np.float32}
MASK_DTYPES = ("U8", "I8", "BOOL")
MAX_HEADER_BYTES = 1 << 20  # a header holds names, shapes, ids and a plan: far below this
MAX_ABS_HIDDEN = 65504.0  # the fp16 range every tier ships in: a state beyond it overflows the model's arithmetic


class WireError(Exception):
    """A continuation request this tier refuses: HTTP status and a message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class HiddenState:
    hidden: np.ndarray  # (B, T, H) float16 or float32
    attention_mask: np.ndarray  # (B, T) 0/1
    layer: int
    model_id: str
    ids: list[str]
    plan: Plan | None = None  # stages still to run; None: the receiving tier's own exit
    confidence: str = "max_prob"

    def __len__(self) -> int:
        return len(self.ids)


# ---- plans as JSON (the HTTP API spells stages as objects; router.json as lists) ------------------------------
def plan_to_json(plan: Plan) -> list[dict]:
    return [{"tier": TIERS[s.tier], "exit": s.exit, "threshold": s.threshold} for s in plan]


def plan_from_json(raw) -> Plan:
    """A plan from its JSON form; any mistake is a ConfigError saying what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("'plan' must be a non-empty list of stages")
    stages = []
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or set(s) - {"tier", "exit", "threshold"} or not {"tier", "exit"} <= set(s):
            raise ConfigError(f"plan stage {i} must be an object with 'tier', 'exit' and 'threshold'")
        tier, exit_index, threshold = s["tier"], s["exit"], s.get("threshold")
        if not isinstance(tier, str) or tier not in TIERS:
            raise ConfigError(f"plan stage {i}: unknown tier {tier!r} (use one of {', '.join(TIERS)})")
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or not 0 <= exit_index <= 2:
            raise ConfigError(f"plan stage {i}: 'exit' must be 0 (m), 1 (n) or 2 (l), got {exit_index!r}")
        if threshold is not None and not finite_number(threshold):
            raise ConfigError(f"plan stage {i}: 'threshold' must be a finite number or null, got {threshold!r}")
        stages.append(Stage(TIERS.index(tier), exit_index, None if threshold is None else float(threshold)))
    return check_plan(tuple(stages))


# ---- encode / decode --------------------------------------------------------------------------------------------
def encode(hidden_rows: list[np.ndarray], layer: int, model_id: str, ids: list[str], plan: Plan | None = None,
           confidence: str = "max_prob", dtype=np.float16) -> bytes:
    """Per-sample hidden states (T_i, H) over real tokens -> one body, rows zero-padded to the longest."""
    from safetensors.numpy import save

    width = max(len(h) for h in hidden_rows)
    hidden = np.zeros((len(hidden_rows), width, hidden_rows[0].shape[1]), dtype=dtype)  # (B, T, H)
    mask = np.zeros((len(hidden_rows), width), dtype=np.uint8)  # (B, T)
    for i, h in enumerate(hidden_rows):
        hidden[i, : len(h)] = h
        mask[i, : len(h)] = 1
    metadata = {"dimec": WIRE_VERSION, "model": model_id, "layer": str(int(layer)), "ids": json.dumps(list(ids)),
                "confidence": confidence}
    if plan is not None:
        metadata["plan"] = json.dumps(plan_to_json(plan))
    return save({"hidden": hidden, "attention_mask": mask}, metadata=metadata)


def decode(body: bytes) -> HiddenState:
    """A body -> HiddenState; anything malformed is a WireError(422) that says what."""
    header = _header(body)
    meta = header.pop("__metadata__", None)
    if set(header) != {"hidden", "attention_mask"}:
        raise WireError(422, f"the body must hold exactly the tensors 'hidden' and 'attention_mask', got "
                             f"{[_short(k) for k in sorted(header)[:5]]}")
    h, m = header["hidden"], header["attention_mask"]
    if not isinstance(h.get("dtype"), str) or h["dtype"] not in HIDDEN_DTYPES:
        raise WireError(422, f"'hidden' must be F16 or F32, got {_short(h.get('dtype'))}")
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in MASK_DTYPES:
        raise WireError(422, f"'attention_mask' must be U8, I8 or BOOL, got {_short(m.get('dtype'))}")
    shapes = h.get("shape"), m.get("shape")
    if not all(isinstance(s, list) and all(natural(d) and d < 2**31 for d in s) for s in shapes):
        raise WireError(422, f"tensor shapes must be lists of integers, got {_short(shapes[0])} and "
                             f"{_short(shapes[1])}")
    if len(h.get("shape", ())) != 3 or len(m.get("shape", ())) != 2 or list(h["shape"][:2]) != list(m["shape"]):
        raise WireError(422, f"'hidden' must be (B, T, H) and 'attention_mask' (B, T), got {h.get('shape')} and "
                             f"{m.get('shape')}")
    batch, width, size = h["shape"]
    if batch < 1 or width < 1 or size < 1:
        raise WireError(422, f"empty hidden state {h['shape']}")
    meta = _metadata(meta, batch)
    try:
        from safetensors.numpy import load

        tensors = load(body)
    except Exception as exc:  # noqa: BLE001  (any parse failure of client bytes is the client's error)
        raise WireError(422, f"the body is not a valid safetensors file ({str(exc)[:200]})") from None
    hidden, mask = tensors["hidden"], tensors["attention_mask"].astype(np.int64)
    if not np.isfinite(hidden).all():
        raise WireError(422, "'hidden' holds NaN or infinite values")
    if np.abs(hidden).max() > MAX_ABS_HIDDEN:
        raise WireError(422, f"'hidden' holds values beyond +-{MAX_ABS_HIDDEN:g} (the fp16 range): no layer of the "
                             "model produces them, and they overflow its arithmetic")
    if ((mask != 0) & (mask != 1)).any():
        raise WireError(422, "'attention_mask' must hold only 0 and 1")
    if (mask.sum(1) == 0).any():
        raise WireError(422, "every row of 'attention_mask' needs at least one real token")
    if (mask[:, 1:] > mask[:, :-1]).any():  # a hole: the tiers forward and compact by the first sum(mask) rows
        raise WireError(422, "each row of 'attention_mask' must be its real tokens first, then padding "
                             "(1...1 0...0): a 0 before a 1 is refused")
    return HiddenState(hidden, mask, meta["layer"], meta["model"], meta["ids"], meta["plan"], meta["confidence"])


def _header(body: bytes) -> dict:
    if len(body) < 8:
        raise WireError(422, "the body is not a safetensors file (shorter than its 8-byte header size)")
    (size,) = struct.unpack("<Q", body[:8])
    if size > min(MAX_HEADER_BYTES, len(body) - 8):
        raise WireError(422, f"the safetensors header claims {size} bytes; the body has {len(body) - 8} after "
                             "the size field")
    try:
        header = json.loads(body[8 : 8 + size].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, a number of 5000 digits, deep nesting
        raise WireError(422, f"the safetensors header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise WireError(422, "the safetensors header must be a JSON object of tensor entries")
    return header


def _metadata(meta, batch: int) -> dict:
    if not isinstance(meta, dict):
        raise WireError(422, "the body has no metadata (dimec, model, layer, ids)")
    if meta.get("dimec") != WIRE_VERSION:
        raise WireError(422, f"unknown wire format version {meta.get('dimec')!r}; this tier reads {WIRE_VERSION!r}")
    model = meta.get("model")
    if not isinstance(model, str) or not model:
        raise WireError(422, "metadata 'model' (the model identity) is missing")
    if not all(isinstance(meta.get(k, ""), str) for k in ("layer", "ids", "plan", "confidence")):
        raise WireError(422, "metadata values must be strings (safetensors metadata is a string map)")
    try:
        layer_text = meta.get("layer", "")
        if not re.fullmatch(r"-?[0-9]{1,4}", layer_text):  # int() also takes " 1_0 " and 5000 digits
            raise ValueError(layer_text)
        layer = int(layer_text)
        ids = json.loads(meta.get("ids", ""))
        plan_raw = json.loads(meta["plan"]) if "plan" in meta else None
    except (ValueError, RecursionError):
        raise WireError(422, "metadata 'layer' must be an integer and 'ids' (and 'plan') JSON") from None
    problem = ids_problem(ids, batch)
    if problem:
        raise WireError(422, f"metadata 'ids': {problem}")
    confidence = meta.get("confidence", "max_prob")
    if confidence not in CONFIDENCES:
        raise WireError(422, f"metadata 'confidence' must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    try:
        plan = None if plan_raw is None else plan_from_json(plan_raw)
    except ConfigError as exc:
        raise WireError(422, f"metadata 'plan': {exc.message}") from None
    return {"model": model, "layer": layer, "ids": ids, "plan": plan, "confidence": confidence}


def _short(value) -> str:
    """A value from a client's header, safe and short enough to quote in an error."""
    return ascii(value)[:80]
