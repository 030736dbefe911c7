"""TierModel: the one class that loads a tier package and classifies. The FastAPI server, the Ray Serve
deployments and the mobile client all go through it, so a tier behaves the same wherever it runs.

Backends: "torch" (any tier), "onnx" and "onnx-int8" (the mobile package, run with onnxruntime; one
intra-op thread by default: a phone answers one user's texts, mostly one at a time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dimec.errors import ArtifactError, ConfigError
from dimec.serving.package import MODEL_SUBDIR, read_manifest
from dimec.tiers import tier_index

BACKENDS = ("torch", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
EMBED_ONNX = "embed.onnx"
CHUNK = 32  # samples per forward pass: bounds memory and padding for big batches


@dataclass
class Batch:
    """Tokenised samples padded to one width: (N, T) int64 arrays."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, index) -> Batch:
        """The chosen samples, with padding columns none of them needs cut off."""
        index = np.asarray(index, dtype=np.int64)
        mask = self.attention_mask[index]
        width = max(1, int(mask.sum(1).max())) if len(index) else 1
        types = None if self.token_type_ids is None else self.token_type_ids[index, :width]
        return Batch(self.input_ids[index, :width], mask[:, :width], types)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


@dataclass
class Prediction:
    probs: np.ndarray  # (N, C) softmax(logits / T) of this tier's exit
    label_ids: np.ndarray  # (N,)
    labels: list[str]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


class TierModel:
    def __init__(self, package: str | Path, backend: str = "torch", verify: bool = True,
                 onnx_threads: int = 1) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        self.directory = Path(package)
        self.manifest = read_manifest(self.directory, verify=verify)
        self.tier: str = self.manifest["tier"]
        self.tier_index = tier_index(self.tier)
        self.exit_layers = tuple(self.manifest["exit_layers"])
        self.exit_layer: int = self.exit_layers[self.tier_index]
        self.label_names: list[str] = list(self.manifest["label_names"])
        self.max_length: int = int(self.manifest["max_length"])
        self.backend = backend
        self._lock = threading.Lock()  # tokenizers' fast backend is not safe to share across threads
        if backend == "torch":
            from dimec.modeling.multi_exit import MultiExitModel

            self.model = MultiExitModel.from_pretrained(self.directory / MODEL_SUBDIR).eval()
            self.tokenizer = self.model.tokenizer
        else:
            self._load_onnx(backend, onnx_threads)
        if self.tokenizer is None:
            raise ArtifactError(f"package {self.directory} has no tokenizer", "export the package again")
        # Confidences at this exit's fitted temperature (issue 9), read from the package's dimec_model.json
        # for every backend: the ONNX graphs output raw logits, and TierModel applies it to them.
        from dimec.modeling.multi_exit import MultiExitConfig

        model_dir = self.directory / MODEL_SUBDIR
        self.temperature = float(MultiExitConfig.load(model_dir).exit_temperatures(str(model_dir))[self.tier_index])

    def _load_onnx(self, backend: str, threads: int) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        path = self.directory / ONNX_FILES[backend]
        if self.tier != "mobile" or not path.is_file():
            raise ArtifactError(f"{self.directory} has no {path.name} (only the mobile package is exported to ONNX)",
                                "run `dimec export RUN_DIR` (without --no-onnx), or use --backend torch")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads would spin on cores the phone (or, here, the servers) needs for other work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.embed_session = ort.InferenceSession(str(self.directory / EMBED_ONNX), options, providers=providers)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.embed_input_names = {i.name for i in self.embed_session.get_inputs()}
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory / MODEL_SUBDIR)

    # ---- inference ------------------------------------------------------------------------------------
    def encode(self, texts: list[str], pairs: list[str] | None = None) -> Batch:
        kwargs = {"truncation": True, "max_length": self.max_length, "padding": True, "return_tensors": "np"}
        with self._lock:
            enc = self.tokenizer(texts, pairs, **kwargs) if pairs is not None else self.tokenizer(texts, **kwargs)
        types = enc.get("token_type_ids")
        return Batch(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64),
                     None if types is None else types.astype(np.int64))

    def logits(self, batch: Batch) -> np.ndarray:
        """(N, C) logits at this tier's exit, running only layers 1..exit_layer."""
        return self._chunked(batch, self._logits)

    def embed(self, batch: Batch) -> np.ndarray:
        """(N, H) routing embedding: the embedding layer's output mean-pooled over real tokens."""
        return self._chunked(batch, self._embed)

    def probs(self, batch: Batch) -> np.ndarray:
        """(N, C) calibrated confidences: softmax(logits / T) at this tier's exit."""
        return softmax(self.logits(batch) / self.temperature)

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> Prediction:
        probs = self.probs(self.encode(texts, pairs))
        ids = probs.argmax(-1)
        return Prediction(probs, ids, [self.label_names[i] for i in ids])

    def _chunked(self, batch: Batch, fn) -> np.ndarray:
        order = np.argsort(batch.attention_mask.sum(1), kind="stable")  # similar lengths share a pass
        out = None
        for start in range(0, len(order), CHUNK):
            index = order[start : start + CHUNK]
            part = fn(batch.rows(index))
            if out is None:
                out = np.empty((len(batch), part.shape[1]), dtype=np.float32)
            out[index] = part
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def _logits(self, batch: Batch) -> np.ndarray:
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                inputs = {k: torch.from_numpy(v) for k, v in batch.arrays().items()}
                return self.model(**inputs, upto=self.tier_index)[-1].float().numpy()
        feed = {k: v for k, v in batch.arrays().items() if k in self.input_names}
        return self.session.run(["logits"], feed)[0]

    def _embed(self, batch: Batch) -> np.ndarray:
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                inputs = {k: torch.from_numpy(v) for k, v in batch.arrays().items()}
                return self.model.embed(**inputs).float().numpy()
        feed = {k: v for k, v in batch.arrays().items() if k in self.embed_input_names}
        return self.embed_session.run(["embedding"], feed)[0]
