import numpy as np
import pytest
import torch

from dimec.errors import ArtifactError, ConfigError, ModelError
from dimec.modeling.multi_exit import (
    MultiExitConfig,
    MultiExitModel,
    check_exit_layers,
    default_exit_layers,
    masked_mean,
)


def tiny_config(encoder, labels=("neg", "pos"), exit_layers=(1, 2, 2)) -> MultiExitConfig:
    return MultiExitConfig(name_or_path=str(encoder), exit_layers=exit_layers, label_names=list(labels))


@pytest.fixture()
def model(tiny_encoder):
    return MultiExitModel.from_encoder(tiny_config(tiny_encoder)).eval()


def _inputs(model, texts=("good film", "the plot was very dull and the acting quite poor")):
    enc = model.tokenizer(list(texts), padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_sliced_forward_equals_full_forward(model):
    inputs = _inputs(model)
    with torch.no_grad():
        full = model(**inputs)
        for upto in range(3):
            part = model(**inputs, upto=upto)
            assert len(part) == upto + 1
            for a, b in zip(part, full[: upto + 1], strict=True):
                torch.testing.assert_close(a, b)
            sliced = model.slice(upto)  # the weights a tier package ships
            assert sum(p.numel() for p in sliced.parameters()) <= sum(p.numel() for p in model.parameters())
            torch.testing.assert_close(sliced(**inputs)[-1], full[upto])


def test_mobile_runs_only_its_layers(model):
    calls = []
    layers = model.encoder.encoder.layer
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**_inputs(model), upto=0)
    for h in hooks:
        h.remove()
    assert calls == [0]  # m = 1: only layer 1 ran


def test_slice_keeps_only_tier_layers(model):
    mobile = model.slice(0)
    assert len(mobile.encoder.encoder.layer) == 1 and len(mobile.exits) == 1


def test_embedding_is_pooled_over_real_tokens(model):
    one = _inputs(model, ["good film"])
    padded = _inputs(model, ["good film", "the plot was very dull and the acting quite poor and boring"])
    with torch.no_grad():
        torch.testing.assert_close(model.embed(**one)[0], model.embed(**padded)[0], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = MultiExitModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    inputs = _inputs(model)
    with torch.no_grad():
        for a, b in zip(model(**inputs), loaded(**inputs), strict=True):
            torch.testing.assert_close(a, b)
    assert loaded.tokenizer("good film")["input_ids"] == model.tokenizer("good film")["input_ids"]
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))  # no pickle


def test_default_exit_layers():
    assert default_exit_layers(6) == (2, 3, 6)
    assert default_exit_layers(12) == (4, 6, 12)
    for depth in range(2, 25):  # every depth from 2 up gets valid exits (1 <= m < n <= l)
        assert check_exit_layers(default_exit_layers(depth), depth)
    assert default_exit_layers(2) == (1, 2, 2)


@pytest.mark.parametrize("layers, message", [((2, 2, 6), "1 <= m < n <= l"), ((3, 2, 6), "1 <= m < n <= l"),
                                             ((2, 3, 8), "beyond the model's depth"), ((0, 1, 2), "1 <= m")])
def test_bad_exit_layers(layers, message):
    with pytest.raises(ConfigError, match=message):
        check_exit_layers(layers, 6)


def test_bad_exit_layers_through_constructor(tiny_encoder):
    with pytest.raises(ConfigError, match="beyond"):
        MultiExitModel.from_encoder(tiny_config(tiny_encoder, ["a", "b"], (1, 2, 5)))


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelError, match="not found|cannot load"):
        MultiExitModel.from_encoder(MultiExitConfig(name_or_path=str(tmp_path / "nope"), label_names=["a", "b"]))
    with pytest.raises(ArtifactError, match="not a dimec model folder"):
        MultiExitModel.from_pretrained(tmp_path)


def test_numpy_embedder_matches_torch_embed(model):
    from dimec.modeling.fast_embed import NumpyEmbedder

    fast = NumpyEmbedder(model)
    for text, pair in (("good film", None), ("the plot was dull", "acting quite poor")):
        enc = model.tokenizer(text, pair, return_tensors="pt")
        with torch.no_grad():
            ref = model.embed(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0].numpy()
        ours = fast(enc["input_ids"][0].numpy(), enc["token_type_ids"][0].numpy())
        assert abs(ours - ref).max() < 1e-5


def test_fast_router_decides_like_nearest_centroid_of_embed(model):
    from dimec.modeling.fast_embed import FastRouter, NumpyEmbedder
    from dimec.routing.pools import nearest_centroid

    fast = NumpyEmbedder(model)
    rng = np.random.default_rng(0)
    samples = [model.tokenizer(t, p) for t, p in (("good film", None), ("the plot was dull", "acting quite poor"),
                                                   ("a b c d e f g", None), ("fun", "not fun at all"))]
    embeddings = np.stack([fast(s["input_ids"], s["token_type_ids"]) for s in samples])  # (S, H)
    for trial in range(20):
        centroids = embeddings[rng.choice(len(samples), 3)] + rng.normal(0, 0.05, (3, embeddings.shape[1]))
        if trial % 4 == 0:
            centroids[trial % 3] = np.nan  # an empty pool is never chosen
        router = FastRouter(fast, centroids)
        for s, e in zip(samples, embeddings, strict=True):
            assert router(s["input_ids"], s["token_type_ids"]) == nearest_centroid(e[None], centroids)[0]
    with pytest.raises(ValueError, match="max_tokens"):
        FastRouter(fast, centroids, max_tokens=3)(samples[1]["input_ids"])


def test_continuing_from_a_hidden_state_equals_the_full_forward(model):
    """Model-distributed paths: layers 1..m on one tier, m+1..n on the next, n+1..l on the last."""
    inputs = _inputs(model)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        full = model(**inputs)
        hidden = model.embedding_output(**inputs)  # after layer 0
        torch.testing.assert_close(model.embed(**inputs), masked_mean(hidden, mask))
        layer = 0
        for index in range(3):  # exit layers (1, 2, 2): the last step runs no layer, only the exit
            logits, hidden = model.continue_from(hidden, mask, layer, index)
            layer = model.config.exit_layers[index]
            torch.testing.assert_close(logits, full[index])
        edge = model.slice(1)  # a tier holding layers 1..n continues from the mobile's hidden state
        after_m = model.run_layers(model.embedding_output(**inputs), mask, 0, 1)
        torch.testing.assert_close(edge.continue_from(after_m, mask, 1, 1)[0], full[1])
    with pytest.raises(ValueError, match="below"):
        model.continue_from(hidden, mask, 2, 0)
    with pytest.raises(ValueError, match="holding"):
        edge.run_layers(hidden, mask, 0, 3)
    with pytest.raises(ValueError, match="not held"):
        edge.continue_from(hidden, mask, 0, 2)
