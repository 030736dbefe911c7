"""The adapter is the only code that touches transformers internals: check it against the library."""

import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

from dimec.errors import ModelError
from dimec.modeling import hf_adapter

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)


def _layer_by_layer(encoder, ids, mask, types=None):
    hidden = hf_adapter.embed_tokens(encoder, ids, types)
    layer_mask = hf_adapter.layer_mask(encoder, hidden, mask)
    for layer in hf_adapter.encoder_layers(encoder):
        hidden = hf_adapter.run_layer(layer, hidden, layer_mask)
    return hidden


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_layer_by_layer_equals_library_forward(family):
    torch.manual_seed(0)
    if family == "bert":
        encoder = BertModel(BertConfig(**SMALL))
    elif family == "roberta":
        encoder = RobertaModel(RobertaConfig(**SMALL, pad_token_id=1))
    else:
        encoder = DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=99))
    encoder.eval()
    ids = torch.randint(3, 99, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0  # padding must be masked exactly as the library does
    mask[2, 2:] = 0
    with torch.no_grad():
        ours = _layer_by_layer(encoder, ids, mask)
        ref = hf_adapter.reference_last_hidden(encoder, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)


def test_truncate_and_errors():
    encoder = BertModel(BertConfig(**{**SMALL, "num_hidden_layers": 3}))
    hf_adapter.truncate_layers(encoder, 1)
    assert hf_adapter.num_layers(encoder) == 1 and encoder.config.num_hidden_layers == 1
    with pytest.raises(ModelError, match="BERT-family"):
        hf_adapter.encoder_layers(torch.nn.Linear(2, 2))
