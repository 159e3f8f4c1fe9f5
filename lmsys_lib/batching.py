"""Batches of packed rows: length-grouped for training, length-sorted for evaluation, right-padded.

Contract:
- batch orders are pure functions of (lengths, batch size, seed, epoch): a resumed run rebuilds exactly
  the order it was in;
- every row appears exactly once per epoch; groups of similar length keep padding small, and the order of
  the groups is shuffled so training does not see lengths in a trend;
- ``collate`` pads on the right with ``pad_id`` and returns an attention mask; real tokens keep positions
  0..n-1 (left padding would shift them for models that derive positions from the sequence index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                           group_batches: int = 16) -> list[list[int]]:
    """Row indices in batches of ``batch_size`` rows of similar length.

    Rows are shuffled, cut into mega-groups of ``group_batches × batch_size`` rows, each sorted by length
    and cut into batches; then the batches are shuffled. Deterministic in (seed, epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    size = batch_size * group_batches
    batches = []
    for start in range(0, len(order), size):
        group = order[start: start + size]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i: i + batch_size].tolist() for i in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices sorted by length (longest first), in batches: for evaluation and inference."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i: i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_rows: int = 256) -> list[list[int]]:
    """Rows sorted by length (longest first) in batches whose padded size — rows × longest row — stays
    within ``token_budget`` (at most ``max_rows`` rows); a row longer than the budget gets a batch alone.
    Deterministic in (lengths, budget, max_rows)."""
    if token_budget < 1 or max_rows < 1:
        raise ValueError("token_budget and max_rows must be >= 1")
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    for row in order.tolist():
        longest = int(lengths[current[0]]) if current else int(lengths[row])
        if current and ((len(current) + 1) * longest > token_budget or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Shuffled rows in fixed-size batches, no length grouping (the naive baseline)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i: i + batch_size].tolist() for i in range(0, n, batch_size)]


def pad_waste(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Computed tokens ÷ real tokens − 1 when each batch is padded to its longest row."""
    lengths = np.asarray(lengths)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return computed / int(lengths.sum()) - 1.0


def collate(rows: Sequence[Sequence[int]], pad_id: int, labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Right-pad id sequences into tensors.

    >>> batch = collate([[5, 6, 7], [8]], pad_id=0, labels=[2, 0])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [2, 0])
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(np.asarray(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return batch
