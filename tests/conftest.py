"""Shared fixtures: a tiny random BERT (hidden 32, 2 layers) with a word-level tokenizer, and a small
labelled CSV task, so model/training/pipeline tests run in well under a second each."""

from __future__ import annotations

import csv
import random
from contextlib import contextmanager
from pathlib import Path

import pytest

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "was", "very", "plot", "acting", "quite", "a", "and"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def make_tiny_encoder(directory: Path, layers: int = 2, hidden: int = 32, intermediate: int = 37) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    # built from a tokenizers object: BertTokenizerFast(vocab_file=...) ignores the file in transformers 5
    core = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.BertProcessing(("[SEP]", VOCAB.index("[SEP]")), ("[CLS]", VOCAB.index("[CLS]")))
    tokenizer = BertTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=intermediate, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_sentiment_csv(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Separable toy sentiment: one sentiment word among filler; long and short texts."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            word = rng.choice(POSITIVE if label else NEGATIVE)
            filler = rng.choices(FILLER, k=rng.randint(2, 12))
            filler.insert(rng.randrange(len(filler) + 1), word)
            w.writerow([" ".join(filler), "pos" if label else "neg"])
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_task_csv(tmp_path_factory) -> Path:
    return make_sentiment_csv(tmp_path_factory.mktemp("tiny_task") / "sentiment.csv")


def tiny_run_config(encoder: Path, task_csv: Path, **train):
    from dimec.config import RunConfig

    return RunConfig.from_dict({
        "data": {"task": "file", "path": str(task_csv), "max_length": 32},
        "model": {"name_or_path": str(encoder), "exit_layers": [1, 2, 2]},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "progress": False, **train},
        # a point estimate: the tiny run's 40 validation rows leave expected-loss control (the default) no room
        # beyond cloud-only, and the serving tests need a policy that uses every tier
        "calibration": {"beta_grid": [0.0, 0.001, 0.01, 0.05], "control": "point"},
    })


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_encoder, tiny_task_csv) -> Path:
    """A trained, calibrated and evaluated run directory on the tiny model (about a second)."""
    from dimec.pipeline import run_all

    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_all(tiny_run_config(tiny_encoder, tiny_task_csv), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def unscaled_tiny_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run with its exits read at T = 1. The tiny model separates its small validation split, so
    the fitted temperatures sharpen every confidence to 0 or 1; tests of thresholds need them spread."""
    import json
    import shutil

    from dimec.modeling.multi_exit import MODEL_CONFIG

    run_dir = tmp_path_factory.mktemp("unscaled") / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("packages"))
    path = run_dir / "model" / MODEL_CONFIG
    path.write_text(json.dumps(json.loads(path.read_text()) | {"temperatures": [1.0, 1.0, 1.0]}))
    return run_dir


# ---- serving over loopback (the tests of servers and clients share these) ---------------------------------------
def tier_models(packages: dict) -> dict:
    """One TierModel per tier package, in process."""
    from dimec.runtime.tier import TierModel

    return {tier: TierModel(packages[tier]) for tier in ("mobile", "edge", "cloud")}


@contextmanager
def edge_and_cloud(models: dict, token: str):
    """A cloud, then an edge that forwards plans going on to it (no retries, no cool-down: a failure shows at
    once); uvicorn threads on loopback, stopped on exit. Yields {"edge": server, "cloud": server}."""
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.phone.remote import HttpRemote, Timeouts
    from dimec.serving.servers.server import create_app

    cloud = ThreadServer(create_app(None, "cloud", token, model=models["cloud"])).start()
    forward = HttpRemote("cloud", cloud.url, token, Timeouts(0.5, 5), retries=0, cooldown_s=0.0)
    edge = ThreadServer(create_app(None, "edge", token, model=models["edge"], forward=forward)).start()
    try:
        yield {"edge": edge, "cloud": cloud}
    finally:
        edge.stop()
        cloud.stop()


def mobile_package_with_router(mobile: Path, directory: Path, router) -> Path:
    """A copy of the mobile package `mobile` at `directory` whose router.json holds `router` (a fitted or
    loaded plan router), its manifest rewritten to match."""
    import shutil

    from dimec.config import CostConfig
    from dimec.costs import CostModel
    from dimec.routing.base import save_router
    from dimec.runtime.package import ROUTER_FILE, read_manifest, write_manifest

    shutil.copytree(mobile, directory)
    layers = tuple(read_manifest(directory)["exit_layers"])
    save_router(router, directory / ROUTER_FILE, CostModel.from_config(CostConfig(), layers))
    manifest = read_manifest(directory, verify=False)
    manifest.pop("files")
    write_manifest(directory, manifest)
    return directory


# ---- a fake tier for `dimec monitor` (tests and benchmarks/reliability_serving.py) -------------------------------
class FakeTier:
    """A loopback HTTP server that answers /metrics and /v1/drift/reference with whatever a test sets."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.metrics, self.reference = "", "{}"
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = (owner.metrics if self.path == "/metrics" else owner.reference).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
