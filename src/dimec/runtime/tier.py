"""TierModel: the one class that loads a tier package and classifies. The FastAPI server, the Ray Serve
deployments and the mobile client all go through it, so a tier behaves the same wherever it runs.

Backends: "torch" (any tier), "onnx" and "onnx-int8" (the mobile package, run with onnxruntime; one
intra-op thread by default: a phone answers one user's texts, mostly one at a time).

The mobile ONNX file is one graph with three outputs: the routing embedding, the mobile exit's logits and
the hidden state after layer m. onnxruntime computes every output of a graph on each run, so the client opens
two sessions on it, each pruned to what it needs (route: the embedding; mobile stage: logits and hidden
state), sharing the weights in memory: the router decides before the mobile pays for its layers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dimec.errors import ArtifactError, ConfigError
from dimec.runtime.model_config import MultiExitConfig
from dimec.runtime.package import (
    FORMAT_VERSION,
    MODEL_SUBDIR,
    ONNX_FILES,
    backend_file,
    has_file,
    read_manifest,
)
from dimec.tiers import tier_index

BACKENDS = ("torch", "onnx", "onnx-int8")
CHUNK = 32  # samples per forward pass: bounds memory and padding for big batches
GPU_CHUNK = 256  # on a GPU a bigger pass costs little more than a small one (dynamic batching fills it)


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
                 onnx_threads: int = 1, device: str = "cpu", precision: str = "auto") -> None:
        """`device`, `precision`: where the PyTorch backend runs and in what (devices.py: auto is bf16 on a GPU
        that has it, fp16 on an older GPU, fp32 on the CPU); the ONNX backends run on the CPU (the phone)."""
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
        self.model_id: str | None = self.manifest.get("model_id")  # None: exported by an older dimec
        self.backend = backend
        model_dir = self.directory / MODEL_SUBDIR
        self.temperatures = MultiExitConfig.load(model_dir).exit_temperatures(str(model_dir))  # (3,)
        self._lock = threading.Lock()  # tokenizers' fast backend is not safe to share across threads
        self.device, self.precision, self.chunk = None, "fp32", CHUNK  # torch: set below
        needed = backend_file(backend)
        if not has_file(self.directory, needed):
            hint = ("export with `dimec export RUN_DIR --full` for the fp32 and PyTorch copies, or use "
                    "--backend onnx-int8") if self.tier == "mobile" else "export the package again"
            raise ArtifactError(f"the {self.tier} package {self.directory} has no {needed} (backend {backend})",
                                hint)
        if backend == "torch":
            from dimec.devices import DTYPES, resolve_device, resolve_serving_precision
            from dimec.modeling.multi_exit import MultiExitModel

            self.device = resolve_device(device, "--device")
            self.precision = resolve_serving_precision(precision, self.device)
            model = MultiExitModel.from_pretrained(self.directory / MODEL_SUBDIR).eval()
            self.model = model.to(self.device, DTYPES[self.precision])  # no copy on the CPU in fp32
            self.tokenizer = self.model.tokenizer
            if self.device.type != "cpu":
                self.chunk = GPU_CHUNK
        else:
            self._load_onnx(backend, onnx_threads)
        if self.tokenizer is None:
            raise ArtifactError(f"package {self.directory} has no tokenizer", "export the package again")

    def _load_onnx(self, backend: str, threads: int) -> None:
        import onnx
        import onnxruntime as ort
        from transformers import AutoTokenizer

        if self.tier != "mobile":
            raise ArtifactError(f"{self.directory} is the {self.tier} package; only the mobile one has ONNX graphs",
                                "use --backend torch")
        if self.manifest.get("format_version", 1) < FORMAT_VERSION:
            raise ArtifactError(f"the mobile package {self.directory} was exported by an older dimec "
                                "(no hidden-state output)", "run `dimec export RUN_DIR` again")
        graph = onnx.load(str(self.directory / ONNX_FILES[backend]))
        route, stage = prune(graph, ["embedding"]), prune(graph, ["logits", "hidden"])
        # Weights both pruned graphs use (the embedding tables) are created once and handed to both sessions.
        shared = {i.name for i in route.graph.initializer} & {i.name for i in stage.graph.initializer}
        self._shared = {i.name: ort.OrtValue.ortvalue_from_numpy(onnx.numpy_helper.to_array(i))
                        for i in graph.graph.initializer if i.name in shared}  # must outlive the sessions
        sessions = []
        for proto in (route, stage):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle pool threads would spin on cores the phone (or, here, the servers) needs for other work.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            for name, value in self._shared.items():
                options.add_initializer(name, value)
            sessions.append(ort.InferenceSession(proto.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"]))
        self.embed_session, self.session = sessions
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

    @property
    def temperature(self) -> float:
        """This tier's own exit temperature."""
        return float(self.temperatures[self.tier_index])

    def exit_probs(self, logits: np.ndarray, exit_index: int) -> np.ndarray:
        """(N, C) confidences of exit `exit_index`: softmax(logits / T) at that exit's fitted temperature."""
        return softmax(logits / self.temperatures[exit_index])

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> Prediction:
        probs = self.exit_probs(self.logits(self.encode(texts, pairs)), self.tier_index)
        ids = probs.argmax(-1)
        return Prediction(probs, ids, [self.label_names[i] for i in ids])

    def mobile_stage(self, batch: Batch) -> tuple[np.ndarray, list[np.ndarray]]:
        """What the mobile runs for a plan that starts on it: exit m's logits (N, C) and each sample's hidden
        state after layer m, (T_i, H) over its real tokens only (padding is never shipped)."""
        logits = np.empty((len(batch), len(self.label_names)), dtype=np.float32)
        hidden: list[np.ndarray] = [np.empty(0)] * len(batch)
        order = np.argsort(batch.attention_mask.sum(1), kind="stable")
        for start in range(0, len(order), CHUNK):
            index = order[start : start + CHUNK]
            part = batch.rows(index)
            chunk_logits, chunk_hidden = self._stage(part)
            logits[index] = chunk_logits
            for j, i in enumerate(index):
                hidden[i] = chunk_hidden[j, : int(part.attention_mask[j].sum())]
        return logits, hidden

    def _stage(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                inputs = self._inputs(batch)
                hidden = self.model.embedding_output(**inputs)
                logits, hidden = self.model.continue_from(hidden, inputs["attention_mask"], 0, 0)
                return _numpy(logits), _numpy(hidden)
        feed = {k: v for k, v in batch.arrays().items() if k in self.input_names}
        logits, hidden = self.session.run(["logits", "hidden"], feed)
        return logits, hidden

    def continue_from(self, hidden: np.ndarray, mask: np.ndarray, layer: int,
                      exit_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, H) hidden state after `layer` -> exit `exit_index`'s logits (B, C) and the hidden state after
        its layer (B, T, H). PyTorch backend (the edge and cloud servers)."""
        import torch

        from dimec.devices import DTYPES

        with torch.inference_mode():
            state = torch.from_numpy(np.ascontiguousarray(hidden, np.float32))
            logits, out = self.model.continue_from(state.to(self.device, DTYPES[self.precision]),
                                                   torch.from_numpy(mask.astype(np.int64)).to(self.device),
                                                   layer, exit_index)
        return _numpy(logits), _numpy(out)

    def start(self, batch: Batch) -> np.ndarray:
        """(N, T, H) the hidden state after layer 0 (the embedding layer's output), PyTorch backend."""
        import torch

        with torch.inference_mode():
            return _numpy(self.model.embedding_output(**self._inputs(batch)))

    def _inputs(self, batch: Batch) -> dict:
        """A batch's arrays as torch tensors on the model's device (ids stay int64)."""
        import torch

        return {k: torch.from_numpy(v).to(self.device) for k, v in batch.arrays().items()}

    def _chunked(self, batch: Batch, fn) -> np.ndarray:
        if len(batch) == 1:  # one sample (a phone's usual call): no sorting or regrouping to pay for
            return fn(batch)
        order = np.argsort(batch.attention_mask.sum(1), kind="stable")  # similar lengths share a pass
        out = None
        for start in range(0, len(order), self.chunk):
            index = order[start : start + self.chunk]
            part = fn(batch.rows(index))
            if out is None:
                out = np.empty((len(batch), part.shape[1]), dtype=np.float32)
            out[index] = part
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def _logits(self, batch: Batch) -> np.ndarray:
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                return _numpy(self.model(**self._inputs(batch), upto=self.tier_index)[-1])
        feed = {k: v for k, v in batch.arrays().items() if k in self.input_names}
        return self.session.run(["logits"], feed)[0]

    def _embed(self, batch: Batch) -> np.ndarray:
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                return _numpy(self.model.embed(**self._inputs(batch)))
        feed = {k: v for k, v in batch.arrays().items() if k in self.embed_input_names}
        return self.embed_session.run(["embedding"], feed)[0]


def _numpy(tensor) -> np.ndarray:
    """A result as float32 numpy on the host, whatever device and precision computed it."""
    return tensor.float().cpu().numpy()


def prune(model, outputs: list[str]):
    """A copy of an ONNX model keeping only the nodes, inputs and weights that `outputs` depend on."""
    import onnx

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack, keep = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    pruned = onnx.helper.make_graph(
        [n for n in graph.node if id(n) in keep], graph.name,
        [i for i in graph.input if i.name in needed], [o for o in graph.output if o.name in outputs],
        [i for i in graph.initializer if i.name in needed])
    copy = onnx.helper.make_model(pruned, opset_imports=model.opset_import, ir_version=model.ir_version)
    return copy
