"""The one place that touches Hugging Face transformers internals.

Running an encoder layer by layer (so a tier can run only its own layers) needs three things that differ
across transformers versions and model families: the embeddings module, the list of layers, and the
attention-mask format the layers expect. transformers 5.x removed `get_extended_attention_mask` and
`head_mask`; 4.x has no `create_bidirectional_mask`. Keep every such use here (covered by
tests/test_hf_adapter.py, which checks layer-by-layer against the library's own forward).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from dimec.errors import ModelError

try:  # transformers >= 5
    from transformers.masking_utils import create_bidirectional_mask as _create_bidirectional_mask
except ImportError:  # transformers 4.x
    _create_bidirectional_mask = None


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The ordered transformer blocks: BERT/RoBERTa/MiniLM/ELECTRA keep them in `encoder.layer`,
    DistilBERT in `transformer.layer`."""
    for owner in ("encoder", "transformer"):
        layers = getattr(getattr(encoder, owner, None), "layer", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(
        f"{type(encoder).__name__} has no encoder.layer or transformer.layer list",
        "use a BERT-family encoder (BERT, MiniLM, RoBERTa, DistilBERT, ELECTRA)",
    )


def truncate_layers(encoder: nn.Module, keep: int) -> None:
    """Drop every layer after the first `keep` (in place), and the unused pooler."""
    layers = encoder_layers(encoder)
    del layers[keep:]
    if hasattr(encoder.config, "num_hidden_layers"):
        encoder.config.num_hidden_layers = keep
    if hasattr(encoder.config, "n_layers"):  # DistilBERT
        encoder.config.n_layers = keep


def drop_pooler(encoder: nn.Module) -> None:
    """Exits have their own heads; the encoder's pooler would only be dead weight in every tier."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


def replace_word_embeddings(encoder: nn.Module, module: nn.Module) -> None:
    """Swap the word-embedding lookup for `module` (ids (B, T) -> (B, T, H)), e.g. an int8 table for export.
    Every BERT-family embeddings module (BERT, RoBERTa, DistilBERT, ELECTRA) calls `word_embeddings(ids)`."""
    embeddings = getattr(encoder, "embeddings", None)
    if not isinstance(getattr(embeddings, "word_embeddings", None), nn.Module):
        raise ModelError(f"{type(encoder).__name__} has no embeddings.word_embeddings", "use a BERT-family encoder")
    embeddings.word_embeddings = module


def freeze_word_embeddings(encoder: nn.Module) -> None:
    """Stop training the (V, H) word-embedding matrix (position and segment embeddings and the embedding
    LayerNorm still train): no AdamW update of the biggest tensor, about 2x faster steps on CPU."""
    words = getattr(getattr(encoder, "embeddings", None), "word_embeddings", None)
    if not isinstance(words, nn.Embedding):
        raise ModelError(f"{type(encoder).__name__} has no embeddings.word_embeddings to freeze",
                         "set train.freeze_word_embeddings=false for this encoder")
    words.weight.requires_grad_(False)


def num_layers(encoder: nn.Module) -> int:
    return len(encoder_layers(encoder))


def embed_tokens(
    encoder: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
) -> torch.Tensor:
    """Embedding-layer output (B, T, H): token + position (+ segment) embeddings, LayerNorm, dropout."""
    embeddings = encoder.embeddings
    params = inspect.signature(embeddings.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if token_type_ids is not None and "token_type_ids" in params:
        kwargs["token_type_ids"] = token_type_ids
    return embeddings(**kwargs)


def layer_mask(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """Turn a (B, T) 0/1 padding mask into whatever the layers of this transformers version expect."""
    if _create_bidirectional_mask is not None:
        return _create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    # transformers 4.x: additive (B, 1, 1, T) mask; DistilBERT's blocks take the raw (B, T) mask.
    if type(encoder).__name__.startswith("DistilBert"):
        return attention_mask
    extended = attention_mask[:, None, None, :].to(hidden.dtype)
    return (1.0 - extended) * torch.finfo(hidden.dtype).min


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
    """One transformer block: (B, T, H) -> (B, T, H). 4.x blocks return tuples, 5.x tensors."""
    out = layer(hidden, attention_mask=mask) if "attention_mask" in inspect.signature(layer.forward).parameters \
        else layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


def reference_last_hidden(encoder: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    """The library's own full forward (for tests that check the layer-by-layer path against it)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None and "token_type_ids" in inspect.signature(encoder.forward).parameters:
        kwargs["token_type_ids"] = token_type_ids
    return encoder(**kwargs).last_hidden_state


def embedding_tables(encoder: nn.Module) -> dict[str, Any]:
    """The embedding layer as plain tensors, for a routing path without module overhead:
    word (V, H), position (P, H), token_type (S, H) or None, LayerNorm weight/bias/eps, and the offset
    of the first position id (RoBERTa counts positions from padding_idx + 1)."""
    emb = encoder.embeddings
    norm = getattr(emb, "LayerNorm", None) or getattr(emb, "layer_norm", None)
    if norm is None:
        raise ModelError(f"{type(emb).__name__} has no LayerNorm", "use a BERT-family encoder")
    offset = emb.padding_idx + 1 if type(encoder).__name__.startswith(("Roberta", "XLMRoberta")) else 0
    types = getattr(emb, "token_type_embeddings", None)
    return {
        "word": emb.word_embeddings.weight.detach(),
        "position": emb.position_embeddings.weight.detach(),
        "token_type": types.weight.detach() if types is not None else None,
        "norm_weight": norm.weight.detach(), "norm_bias": norm.bias.detach(), "eps": float(norm.eps),
        "position_offset": offset,
    }
