"""Tokenise once, then batch with length bucketing so short texts do not pay for long ones."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Encoded:
    """Token ids of N samples, unpadded."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def subset(self, index: Sequence[int]) -> Encoded:
        """The chosen samples, in the order given."""
        types = None if self.token_type_ids is None else [self.token_type_ids[i] for i in index]
        return Encoded([self.input_ids[i] for i in index], types, self.labels[np.asarray(index, dtype=np.int64)])


def encode(tokenizer, examples: Sequence, max_length: int) -> Encoded:
    """examples: objects with .text, .text_pair and .label (dimec.data.Example)."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    kwargs = {"truncation": True, "max_length": max_length, "padding": False}
    enc = tokenizer(texts, pairs, **kwargs) if any(p is not None for p in pairs) else tokenizer(texts, **kwargs)
    return Encoded(
        input_ids=enc["input_ids"],
        token_type_ids=enc.get("token_type_ids"),
        labels=np.asarray([e.label for e in examples], dtype=np.int64),
    )


def collate(enc: Encoded, index: Sequence[int], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the chosen samples to the longest among them (or to `pad_to`, for fixed-length padding)."""
    width = pad_to or max(len(enc.input_ids[i]) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(index), width), dtype=torch.long)  # (B, T)
    types = torch.zeros((len(index), width), dtype=torch.long) if enc.token_type_ids is not None else None
    for row, i in enumerate(index):
        seq = enc.input_ids[i][:width]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        if types is not None:
            types[row, : len(seq)] = torch.tensor(enc.token_type_ids[i][:width])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(enc.labels[list(index)])}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def train_batches(
    lengths: np.ndarray, batch_size: int, seed: int, bucketing: bool = True, bucket_multiplier: int = 50
) -> list[np.ndarray]:
    """Shuffled training batches. With bucketing: shuffle, cut into buckets of `bucket_multiplier`
    batches, sort each bucket by length, batch it, then shuffle the batches (randomness kept, padding cut)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if not bucketing:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = batch_size * bucket_multiplier
    batches = []
    for start in range(0, len(order), span):
        bucket = order[start : start + span]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Inference batches sorted by length; callers scatter results back by index."""
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
