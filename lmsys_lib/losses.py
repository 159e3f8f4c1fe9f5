"""Loss functions: pure, explicit reduction, normalised by the true number of rows.

Every function takes logits (n, 3) and returns the *sum* over rows; the caller divides by the number of
rows the optimiser step really saw (across gradient accumulation and processes), so a short last batch is
not over-weighted and accumulation equals one big batch.
"""

from __future__ import annotations

from typing import Any


def cross_entropy_sum(logits: Any, labels: Any) -> Any:
    """Σ_rows −log softmax(logits)[label], computed in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels.long(), reduction="sum")


def step_loss(row_loss_sum: Any, rows_in_step: int, world_size: int = 1) -> Any:
    """The micro-batch's share of the step loss: sum / rows of the whole step (all processes).

    DDP averages gradients over ``world_size`` processes, so the sum is scaled by ``world_size`` to make
    the averaged gradient equal the gradient of Σ_all rows loss / rows_in_step.
    """
    if rows_in_step <= 0:
        raise ValueError("rows_in_step must be > 0")
    return row_loss_sum * (world_size / rows_in_step)
