"""The mobile tier as one ONNX graph, checked against PyTorch.

    (input_ids, attention_mask[, token_type_ids]) -> logits (B, C)       the mobile exit (layer m)
                                                     embedding (B, H)    what the router reads
                                                     hidden (B, T, H)    the hidden state after layer m

What a phone downloads is `model.int8.onnx`: the word-embedding table stored as int8 with one scale per row
(`Int8Embedding`: Gather -> Cast -> Mul, one quantised copy feeding both the routing embedding and the
layers) and every MatMul weight int8 (onnxruntime dynamic quantisation, per channel, reduced range). With
`full=True` the export also writes `model.onnx` (fp32), for comparisons.

The TorchScript exporter (`dynamo=False`) is used: it needs no onnxscript and traces this model exactly.
The example batch is padded on purpose: transformers builds the attention mask only when there is padding,
and a trace of an unpadded batch would bake "no mask" into the graph.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dimec.modeling import hf_adapter
from dimec.modeling.multi_exit import masked_mean
from dimec.runtime.package import ONNX_FILES, ROUTER_FILE, has_file
from dimec.runtime.plans import confidence
from dimec.runtime.tier import TierModel
from dimec.tiers import MOBILE

OPSET = 17
OUTPUTS = ["logits", "embedding", "hidden"]


class Int8Embedding(nn.Module):
    """A word-embedding table kept as int8 with one fp32 scale per row (symmetric, round to nearest):
    lookup, then dequantise. 1 byte per weight instead of 4; each row's error is at most half its scale."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach().float()  # (V, H)
        scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127  # (V, 1)
        self.register_buffer("weight_q", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q[input_ids].float() * self.scale[input_ids]  # (B, T, H)


class _MobileGraph(nn.Module):
    """(ids, mask[, types]) -> (mobile exit logits (B, C), routing embedding (B, H), hidden after m (B, T, H)),
    all from one embedding lookup."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model.embedding_output(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        embedding = masked_mean(hidden, attention_mask)  # (B, H): what MultiExitModel.embed computes
        logits, hidden = self.model.continue_from(hidden, attention_mask, 0, 0)
        return logits, embedding, hidden


def export_mobile_onnx(model, directory: Path, full: bool = False) -> dict[str, Any]:
    """Write model.int8.onnx (and model.onnx when `full`) for the sliced mobile model into `directory`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="dimec-onnx-") as tmp:
        staged = Path(tmp) / "int8-embedding.onnx"  # int8 embedding table, fp32 MatMuls: quantised next
        quantised = copy.deepcopy(model)
        table = hf_adapter.embedding_tables(quantised.encoder)["word"]
        hf_adapter.replace_word_embeddings(quantised.encoder, Int8Embedding(table))
        names = _trace(quantised, staged)
        if full:
            _trace(model, directory / ONNX_FILES["onnx"])
        # Per-channel scales with a 7-bit range: on MiniLM/Rotten Tomatoes label agreement with fp32 rose from
        # 0.925 (per-tensor) to 0.987 at the same speed; the reduced range avoids u8*s8 overflow on AVX2.
        logging.disable(logging.WARNING)  # onnxruntime logs a generic "consider pre-processing" hint on root
        try:
            quantize_dynamic(str(staged), str(directory / ONNX_FILES["onnx-int8"]), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True)
        finally:
            logging.disable(logging.NOTSET)
    files = {"int8": ONNX_FILES["onnx-int8"], **({"fp32": ONNX_FILES["onnx"]} if full else {})}
    return {"opset": OPSET, "inputs": names, "outputs": OUTPUTS, "files": files,
            "quantization": "word embeddings int8 with one scale per row (Gather -> Cast -> Mul); MatMul weights "
                            "int8 by onnxruntime quantize_dynamic, per channel, reduced range"}


def _trace(model, path: Path) -> list[str]:
    tok = model.tokenizer
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in tok.model_input_names else [])
    enc = tok(["good", "a much longer example text that forces padding in the first row"],
              padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({"logits": {0: "batch"}, "embedding": {0: "batch"}, "hidden": {0: "batch", 1: "sequence"}})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the check below is what counts
        torch.onnx.export(_MobileGraph(model).eval(), tuple(enc[n] for n in names), str(path), input_names=names,
                          output_names=OUTPUTS, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return names


def check_agreement(reference, directory: Path, texts: list[str], pairs: list[str] | None = None,
                    labels: list[int] | None = None, source: str = "given texts") -> dict[str, Any]:
    """Each ONNX graph of a mobile package against the PyTorch model `reference` (the sliced mobile model, fp32)
    on the same tokens: label agreement and max logit difference of the mobile exit, max difference of the
    routing embedding and of the hidden state, routing agreement (the plan the package's router chooses) and
    decision agreement (the plan, and whether its mobile stage answers or passes the sample on), and accuracy
    when labels are known."""
    from dimec.routing.base import load_router

    router, _ = load_router(directory / ROUTER_FILE)
    backends = [b for b in ("onnx", "onnx-int8") if has_file(directory, ONNX_FILES[b])]
    runner = TierModel(directory, backends[-1], verify=False)  # tokenizer and temperatures of the package
    batch = runner.encode(texts, pairs)
    lengths = batch.attention_mask.sum(1)
    with torch.inference_mode():
        inputs = {k: torch.from_numpy(v) for k, v in batch.arrays().items()}
        ref_logits, ref_emb, ref_hidden = (x.float().numpy() for x in _MobileGraph(reference.eval())(**inputs))
    ref_plans, ref_stops = _decisions(router, ref_emb, lengths, runner.exit_probs(ref_logits, MOBILE))
    report: dict[str, Any] = {"samples": len(texts), "source": source, "router": router.name}
    if labels is not None:
        report["torch_accuracy"] = float((ref_logits.argmax(-1) == np.asarray(labels)).mean())
    real = batch.attention_mask.astype(bool)
    for backend in backends:
        onnx_model = TierModel(directory, backend, verify=False)
        emb = onnx_model.embed(batch)
        logits, hidden = onnx_model.mobile_stage(batch)
        plans, stops = _decisions(router, emb, lengths, onnx_model.exit_probs(logits, MOBILE))
        hidden_diff = max(float(np.abs(h - ref_hidden[i][real[i]]).max()) for i, h in enumerate(hidden))
        entry = {
            "agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            "max_logit_diff": float(np.abs(logits - ref_logits).max()),
            "max_embedding_diff": float(np.abs(emb - ref_emb).max()),
            "max_hidden_diff": hidden_diff,
            "hidden_scale": float(np.abs(ref_hidden[real]).max()),
            "route_agreement": float((plans == ref_plans).mean()),
            "decision_agreement": float(((plans == ref_plans) & (stops == ref_stops)).mean()),
        }
        if labels is not None:
            entry["accuracy"] = float((logits.argmax(-1) == np.asarray(labels)).mean())
        report["onnx_fp32" if backend == "onnx" else "onnx_int8"] = entry
    return report


def _decisions(router, embeddings: np.ndarray, lengths: np.ndarray, mobile_probs: np.ndarray):
    """(N,) the plan chosen for each sample and (N,) whether its first stage answers on the mobile."""
    choice = np.asarray(router.choose_plans(embeddings, lengths), dtype=np.int64)
    conf = confidence(mobile_probs, router.confidence_)
    stops = np.zeros(len(choice), dtype=bool)
    for i, p in enumerate(choice):
        first = router.plans_[p][0]
        stops[i] = first.tier == MOBILE and (first.threshold is None or conf[i] >= first.threshold)
    return choice, stops
