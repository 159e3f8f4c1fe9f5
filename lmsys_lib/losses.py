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


DISTILL_MODES = ("kl", "winner")


def distill_sum(logits: Any, labels: Any, teacher_logits: Any, mask: Any | None = None,
                weights: Any | None = None, temperature: float = 1.0, ce_weight: float = 0.5,
                mode: str = "kl") -> Any:
    """Σ_rows of the distillation loss (hard labels + one or more teachers), computed in fp32.

    Args:
        logits: the student's (n, 3).
        labels: the hard labels (n,).
        teacher_logits: (n, t, 3), teacher j's logits for row i at ``[i, j]``.
        mask: (n, t) bool, False where teacher j has no logits for row i (those entries are ignored;
            their values may be anything, NaN included). None: every entry is present.
        weights: (t,) non-negative teacher weights; None: equal.
        temperature: T; both distributions are softened by T and the KL term is scaled by T².
        ce_weight: ``mode="kl"`` only — the row loss is ce_weight·CE + (1 − ce_weight)·KD.
        mode:
            ``"kl"``: KD_i = Σ_j w_j m_ij T²·KL(p_ij^T ‖ q_i^T) / Σ_j w_j m_ij (rows no teacher covers get
            CE only, at weight 1);
            ``"winner"``: the first-place solution's loss, (CE_i + Σ_j m_ij [KL_ij + cos_ij]) / (1 + 2·Σ_j m_ij),
            with cos_ij = 1 − cosine(p_ij, q_i) on probabilities and KL at temperature T (they used T = 1);
            ``weights`` and ``ce_weight`` do not apply.
    Returns:
        The sum over rows (a 0-d tensor): divide by the step's true row count (``step_loss``).
    """
    import torch
    import torch.nn.functional as F

    if mode not in DISTILL_MODES:
        raise ValueError(f"mode must be one of {DISTILL_MODES}, got {mode!r}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    s = logits.float()
    t_logits = teacher_logits.float().to(s.device)
    n, t = t_logits.shape[:2]
    m = torch.ones(n, t, dtype=torch.bool, device=s.device) if mask is None else mask.to(s.device).bool()
    t_logits = torch.where(m[..., None], t_logits, torch.zeros_like(t_logits))  # absent entries: finite
    ce = F.cross_entropy(s, labels.long().to(s.device), reduction="none")
    log_q = F.log_softmax(s / temperature, dim=-1)[:, None, :]  # (n, 1, 3)
    log_p = F.log_softmax(t_logits / temperature, dim=-1)  # (n, t, 3)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2  # (n, t)
    present = m.float()
    if mode == "winner":
        cos = 1.0 - F.cosine_similarity(log_p.exp(), log_q.exp().expand_as(log_p), dim=-1)
        rows = (ce + ((kl + cos) * present).sum(1)) / (1.0 + 2.0 * present.sum(1))
        return rows.sum()
    w = torch.ones(t, device=s.device) if weights is None else torch.as_tensor(weights, dtype=torch.float32,
                                                                               device=s.device)
    if w.shape != (t,) or (w < 0).any():
        raise ValueError(f"weights must be {t} non-negative numbers, got {w.tolist()}")
    wm = w[None, :] * present
    total = wm.sum(1)
    kd = (kl * wm).sum(1) / total.clamp_min(1e-12)
    covered = total > 0
    rows = torch.where(covered, ce_weight * ce + (1.0 - ce_weight) * kd, ce)
    return rows.sum()
