"""Where the log loss comes from, and how to cut it after training: segments, calibration, blending.

Contract:
- ``segments(frame)`` labels every row of a conversation frame (``parsing``) on each *dimension* (length,
  truncation, turns, label, empty/null, identical, length difference, model pair and family); each column is
  a ``pd.Categorical`` over a declared vocabulary, on the frame's index, with no missing value.
- ``segment_report`` gives, per (dimension, segment), rows, log loss, accuracy and the segment's share of
  the total loss. Invariant: within every dimension ``rows`` sums to the number of rows and ``total_loss``
  to the overall summed row loss (``metrics.row_log_loss``), whatever ``min_rows`` (smaller segments are
  pooled, never dropped). Empty segments: a declared segment with no row is omitted by default
  (``min_rows=1``); ``min_rows=0`` lists it with rows 0, total loss 0 and NaN log loss / accuracy.
  Unlabelled rows (label −1) and bad probabilities are refused, naming the count or the row ids.
- ``fit_temperature`` minimises the mean log loss of ``softmax(logits / T)`` over T by a bounded
  golden-section search on log T (deterministic; the NLL is convex in 1/T, so unimodal in log T).
  ``temperature.json`` (``save_temperature``) is what ``lmsys predict`` reads from a model folder.
- ``fit_ensemble_weights``: non-negative weights summing to 1, by exponentiated gradient on the simplex
  (deterministic); the result is never worse than the best single member nor the uniform blend.
- Plots import matplotlib inside the function and use ``Figure`` (no pyplot), so they render headless.

This module never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .eda import markdown_table
from .metrics import log_loss, row_log_loss, softmax
from .parsing import CLASSES, MISSING_TURN, NULL_TURN

LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_tie")
TEMPERATURE_FILE = "temperature.json"
REPORT_COLUMNS = ("dimension", "segment", "rows", "row_share", "log_loss", "accuracy", "total_loss",
                  "loss_share", "excess", "excess_loss")
# Token buckets of the packed/total length; characters use the same edges × 4 (≈ 4 characters per token).
TOKEN_EDGES = (256, 512, 1024, 2048)
TOKEN_NAMES = ("<256 tokens", "256–512 tokens", "512–1k tokens", "1k–2k tokens", "≥2k tokens")
CHAR_EDGES = (1024, 2048, 4096, 8192)
CHAR_NAMES = ("<1k chars", "1k–2k chars", "2k–4k chars", "4k–8k chars", "≥8k chars")
TURN_EDGES = (2, 3, 6)  # 1 | 2 | 3–5 | 6+
TURN_NAMES = ("1 turn", "2 turns", "3–5 turns", "6+ turns")
# len(B) − len(A) in characters, all turns: ≪ below −1000, < in [−1000, −100), ≈ within ±100, ...
LEN_DIFF_EDGES = (-1000, -100, 101, 1001)
LEN_DIFF_NAMES = ("B ≪ A (< −1000 chars)", "B < A (−1000..−101)", "B ≈ A (±100 chars)", "B > A (101..1000)",
                  "B ≫ A (> 1000 chars)")
EMPTY_NAMES = ("none", "A empty/null", "B empty/null", "both empty/null")
# Model family: first matching name prefix (case-insensitive); anything else is "other".
FAMILY_PREFIXES = (("gpt-4", "gpt-4"), ("gpt-3.5", "gpt-3.5"), ("claude", "claude"), ("llama", "llama"),
                   ("mistral", "mistral/mixtral"), ("mixtral", "mistral/mixtral"), ("gemini", "gemini/gemma"),
                   ("gemma", "gemini/gemma"), ("qwen", "qwen"))
FAMILIES = ("gpt-4", "gpt-3.5", "claude", "llama", "mistral/mixtral", "gemini/gemma", "qwen", "other")


# ---------------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------------


def segments(frame: pd.DataFrame, n_tokens: Sequence[int] | None = None,
             truncated: Sequence[bool] | None = None, max_length: int | None = None) -> pd.DataFrame:
    """Segment labels per row (same index as ``frame``), one categorical column per dimension.

    Args:
        frame: a conversation frame from ``parsing.read_competition``.
        n_tokens: token count per row, in frame order (``Packer.pack_frame(...)["n_tokens"]``, or untruncated
            counts from ``eda.token_lengths``); without it the length dimension buckets characters of
            prompt + both responses (``CHAR_NAMES``).
        truncated: per row, whether the packer cut it at the model's max length.
        max_length: the model's max length: names the truncation segments, and, with ``n_tokens`` but no
            ``truncated``, derives ``truncated = n_tokens > max_length`` (right for *untruncated* counts only).
    Returns:
        Columns length, [truncated], turns, [label — only when every row is labelled], empty, identical,
        len_diff, [model_pair, model_family — when the frame has model_a/model_b].
    """
    n = len(frame)
    out: dict[str, pd.Categorical] = {"length": _length_segment(frame, _per_row(n_tokens, n, "n_tokens"))}
    cut = _per_row(truncated, n, "truncated")
    if cut is None and n_tokens is not None and max_length is not None:
        cut = np.asarray(n_tokens) > max_length
    if cut is not None:
        out["truncated"] = _truncated_segment(cut.astype(bool), max_length)
    out["turns"] = _bucket(frame["n_rounds"].to_numpy(), TURN_EDGES, TURN_NAMES)
    labels = frame["label"].to_numpy()
    if n and (labels >= 0).all():
        out["label"] = pd.Categorical.from_codes(labels.astype(int), categories=list(CLASSES))
    out["empty"] = _empty_segment(frame)
    out["identical"] = pd.Categorical.from_codes(frame["identical"].to_numpy().astype(int),
                                                 categories=["different", "identical"])
    out["len_diff"] = _bucket(_chars(frame["response_b"]) - _chars(frame["response_a"]), LEN_DIFF_EDGES,
                              LEN_DIFF_NAMES)
    if {"model_a", "model_b"} <= set(frame.columns):
        out["model_pair"] = _pair_segment(frame["model_a"], frame["model_b"], str)
        out["model_family"] = _pair_segment(frame["model_a"], frame["model_b"], model_family)
    return pd.DataFrame(out, index=frame.index)


def model_family(name: Any) -> str:
    """The family of a model name by ``FAMILY_PREFIXES`` (first prefix that matches), else "other"."""
    low = str(name).strip().lower()
    return next((family for prefix, family in FAMILY_PREFIXES if low.startswith(prefix)), "other")


def _per_row(values: Sequence[Any] | None, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one value per frame row ({n}), got shape {arr.shape}")
    return arr


def _bucket(values: np.ndarray, edges: Sequence[float], names: Sequence[str]) -> pd.Categorical:
    """Bucket i holds edges[i-1] <= v < edges[i]."""
    codes = np.searchsorted(np.asarray(edges), np.asarray(values), side="right")
    return pd.Categorical.from_codes(codes, categories=list(names))


def _chars(column: pd.Series) -> np.ndarray:
    """Visible characters over all turns; null and missing turns count 0."""
    return np.array([sum(len(t) for t in turns if t not in (NULL_TURN, MISSING_TURN)) for turns in column])


def _length_segment(frame: pd.DataFrame, n_tokens: np.ndarray | None) -> pd.Categorical:
    if n_tokens is not None:
        return _bucket(n_tokens, TOKEN_EDGES, TOKEN_NAMES)
    total = sum(_chars(frame[part]) for part in ("prompt", "response_a", "response_b"))
    return _bucket(total, CHAR_EDGES, CHAR_NAMES)


def _truncated_segment(cut: np.ndarray, max_length: int | None) -> pd.Categorical:
    at = f" at {max_length} tokens" if max_length is not None else ""
    return pd.Categorical.from_codes(cut.astype(int), categories=[f"not cut{at}", f"cut{at}"])


def _empty_segment(frame: pd.DataFrame) -> pd.Categorical:
    bad_a = (frame["empty_a"] | frame["null_a"]).to_numpy().astype(int)
    bad_b = (frame["empty_b"] | frame["null_b"]).to_numpy().astype(int)
    return pd.Categorical.from_codes(bad_a + 2 * bad_b, categories=list(EMPTY_NAMES))


def _pair_segment(model_a: pd.Series, model_b: pd.Series, key: Callable[[Any], str]) -> pd.Categorical:
    """"x vs y" with x <= y, so (x, y) and (y, x) are one segment."""
    pairs = [" vs ".join(sorted((key(a), key(b)))) for a, b in zip(model_a, model_b)]
    return pd.Categorical(pairs, categories=sorted(set(pairs)))


# ---------------------------------------------------------------------------------------------------
# Segment report
# ---------------------------------------------------------------------------------------------------


def segment_report(frame: pd.DataFrame, probs: np.ndarray, n_tokens: Sequence[int] | None = None,
                   truncated: Sequence[bool] | None = None, max_length: int | None = None,
                   min_rows: int = 1) -> pd.DataFrame:
    """Log loss per (dimension, segment); the biggest loss contributors first within each dimension.

    Args:
        frame: a labelled conversation frame (label −1 is refused).
        probs: (n, 3) probabilities (A, B, tie) in frame order; rows must be finite, >= 0 and sum to 1.
        n_tokens, truncated, max_length: see ``segments``.
        min_rows: segments with fewer rows are pooled per dimension into one "(other: < min_rows rows)"
            segment, so the sums still hold; 0 also lists declared segments that have no row.
    Returns:
        ``REPORT_COLUMNS``: rows, row_share, log_loss (mean), accuracy, total_loss (summed row loss),
        loss_share, excess (log_loss − overall mean) and excess_loss (rows × excess; sums to 0 per
        dimension). ``top_segments`` ranks across dimensions. ``attrs`` hold the overall rows and log loss.
    """
    labels = _labelled(frame)
    p = check_probs(probs, frame["id"].to_numpy())
    losses = row_log_loss(labels, p)
    correct = p.argmax(axis=1) == labels
    seg = segments(frame, n_tokens, truncated, max_length)
    parts = [_dimension_table(name, seg[name], losses, correct, min_rows) for name in seg.columns]
    report = pd.concat(parts, ignore_index=True)
    _add_shares(report, losses)
    report = report[list(REPORT_COLUMNS)].reset_index(drop=True)
    report.attrs.update(rows=len(losses), log_loss=float(losses.mean()), total_loss=float(losses.sum()))
    return report


def top_segments(report: pd.DataFrame, n: int = 15, by: str = "excess_loss") -> pd.DataFrame:
    """The global top ``n`` segments across dimensions by ``by`` (default: loss above the overall mean,
    which ranks a small bad segment above a big average one; ``total_loss`` ranks by sheer size)."""
    return report.sort_values([by, "rows"], ascending=[False, False], kind="stable").head(n)


def _labelled(frame: pd.DataFrame) -> np.ndarray:
    labels = frame["label"].to_numpy()
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ValueError(f"{unlabelled} of {len(labels)} rows are unlabelled (label -1): a segment report "
                         "needs the true label of every row (use train/OOF rows, not test)")
    if len(labels) == 0:
        raise ValueError("no rows to report on")
    return labels.astype(np.int64)


def check_probs(probs: np.ndarray, ids: Sequence[Any], atol: float = 1e-3) -> np.ndarray:
    """(n, 3) float64 probabilities, or a ``ValueError`` naming (up to 5) offending row ids."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(ids), 3):
        raise ValueError(f"probs must have shape ({len(ids)}, 3) (one row per frame row), got {p.shape}")
    ids = np.asarray(ids)
    checks = (("NaN or infinite", ~np.isfinite(p).all(axis=1)), ("negative", (p < 0).any(axis=1)),
              (f"not summing to 1 (± {atol})", ~np.isclose(p.sum(axis=1), 1.0, rtol=0, atol=atol)))
    for what, bad in checks:
        if bad.any():
            raise ValueError(f"{int(bad.sum())} probability row(s) {what}: ids {ids[bad][:5].tolist()}")
    return p


def _dimension_table(name: str, seg: pd.Series, losses: np.ndarray, correct: np.ndarray,
                     min_rows: int) -> pd.DataFrame:
    cats, codes = list(seg.cat.categories), seg.cat.codes.to_numpy()
    rows = np.bincount(codes, minlength=len(cats))
    total = np.bincount(codes, weights=losses, minlength=len(cats))
    hits = np.bincount(codes, weights=correct.astype(float), minlength=len(cats))
    table = pd.DataFrame({"dimension": name, "segment": cats, "rows": rows, "total_loss": total, "hits": hits})
    small = (table["rows"] < min_rows) & (table["rows"] > 0)
    if small.any():
        pooled = {"dimension": name, "segment": f"(other: < {min_rows} rows)", "rows": table["rows"][small].sum(),
                  "total_loss": table["total_loss"][small].sum(), "hits": table["hits"][small].sum()}
        table = pd.concat([table[~small], pd.DataFrame([pooled])], ignore_index=True)
    table = table[(table["rows"] > 0) | (min_rows == 0)]
    return table.sort_values(["total_loss", "rows"], ascending=False, kind="stable")


def _add_shares(report: pd.DataFrame, losses: np.ndarray) -> None:
    rows = report["rows"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):  # 0-row segments: NaN mean loss and accuracy
        report["log_loss"] = np.where(rows > 0, report["total_loss"] / rows, np.nan)
        report["accuracy"] = np.where(rows > 0, report["hits"] / rows, np.nan)
    mean = float(losses.mean())
    report["row_share"] = rows / len(losses)
    report["loss_share"] = report["total_loss"] / losses.sum() if losses.sum() > 0 else 0.0
    report["excess"] = report["log_loss"] - mean
    report["excess_loss"] = report["total_loss"] - rows * mean


def report_markdown(report: pd.DataFrame, title: str, top: int = 15) -> str:
    """The global top ``top`` loss contributors (``top_segments``) as a markdown section."""
    rows = int(report.loc[report["dimension"] == report["dimension"].iloc[0], "rows"].sum())
    total = float(report.loc[report["dimension"] == report["dimension"].iloc[0], "total_loss"].sum())
    shown = top_segments(report, top)[list(REPORT_COLUMNS)]
    head = (f"## {title}\n\n{rows} rows, log loss {total / max(rows, 1):.4f}. Top {len(shown)} segments by "
            "loss above the overall mean (excess_loss = rows × (segment log loss − overall)).\n")
    return head + "\n" + markdown_table(shown, index=False) + "\n"


# ---------------------------------------------------------------------------------------------------
# OOF logits
# ---------------------------------------------------------------------------------------------------


def oof_frame(oof: str | Path | pd.DataFrame, data: pd.DataFrame,
              teacher: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Join out-of-fold logits (``teacher.OOF_COLUMNS``) to the data rows by id.

    Args:
        oof: an ``oof.parquet`` path or its frame (several teachers stacked: pick one with ``teacher``).
        data: a conversation frame; every one of its ids must have exactly one OOF row and vice versa.
    Returns:
        (``data`` unchanged, in its order, with a ``fold`` column added; (n, 3) float64 logits row-aligned).
    """
    table = pd.read_parquet(oof) if isinstance(oof, (str, Path)) else oof
    missing_cols = [c for c in ("id", *LOGIT_COLUMNS) if c not in table.columns]
    if missing_cols:
        raise ValueError(f"OOF logits lack columns {missing_cols}")
    table = _one_teacher(table, teacher)
    _check_ids(table["id"], data["id"])
    joined = table.set_index("id").loc[data["id"].to_numpy()]
    frame = data.copy()
    if "fold" in joined.columns:
        frame["fold"] = joined["fold"].to_numpy()
    return frame, joined[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)


def _one_teacher(table: pd.DataFrame, teacher: str | None) -> pd.DataFrame:
    names = sorted(table["teacher"].unique().tolist()) if "teacher" in table.columns else []
    if teacher is not None:
        if teacher not in names:
            raise ValueError(f"no OOF rows for teacher {teacher!r}; teachers present: {names}")
        return table[table["teacher"] == teacher]
    if len(names) > 1:
        raise ValueError(f"OOF logits of {len(names)} teachers {names}: pass teacher=<one of them>")
    return table


def _check_ids(oof_ids: pd.Series, data_ids: pd.Series) -> None:
    dup = oof_ids[oof_ids.duplicated()].unique().tolist()
    absent = sorted(set(data_ids.tolist()) - set(oof_ids.tolist()), key=str)
    extra = sorted(set(oof_ids.tolist()) - set(data_ids.tolist()), key=str)
    problems = [f"{len(vals)} {what} (e.g. {vals[:5]})" for what, vals in (
        ("data ids missing from the OOF logits", absent), ("OOF ids not in the data", extra),
        ("ids duplicated in the OOF logits", dup)) if vals]
    if problems:
        raise ValueError("OOF logits do not match the data rows: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------------


def golden_section(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-7) -> float:
    """Minimiser of a unimodal ``f`` on [lo, hi] (the bounds included), deterministic."""
    inv = (math.sqrt(5) - 1) / 2  # 0.618…: each step keeps this fraction of the bracket
    a, b = lo, hi
    c, d = b - inv * (b - a), a + inv * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv * (b - a)
            fd = f(d)
    candidates = ((a + b) / 2, lo, hi)  # the minimum may sit on a bound
    return min(candidates, key=f)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The T in ``bounds`` minimising the mean log loss of ``softmax(logits / T)`` (search on log T)."""
    z, y = _check_logits(logits, labels)
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds}")
    u = golden_section(lambda u: log_loss(y, softmax(z, math.exp(u))), math.log(lo), math.log(hi))
    return float(math.exp(u))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(logits / temperature)``."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return softmax(logits, temperature)


def temperature_report(logits: np.ndarray, labels: np.ndarray, temperature: float,
                       source: str) -> dict[str, Any]:
    """What ``save_temperature`` records: log loss before (T = 1) and after, rows, where T was fitted."""
    z, y = _check_logits(logits, labels)
    after = log_loss(y, apply_temperature(z, temperature))
    return {"log_loss_before": log_loss(y, softmax(z)), "log_loss_after": after, "rows": len(y), "source": source}


def save_temperature(path_dir: str | Path, temperature: float, report: dict[str, Any],
                     overwrite: bool = False) -> Path:
    """Write ``path_dir/temperature.json``: {temperature, log_loss_before, log_loss_after, rows, source}.

    ``report`` is ``temperature_report(...)``. An existing file is kept unless ``overwrite``.
    """
    apply_temperature(np.zeros((1, 3)), temperature)  # validates T
    need = ("log_loss_before", "log_loss_after", "rows", "source")
    missing = [k for k in need if k not in report]
    if missing:
        raise ValueError(f"temperature report lacks {missing} (build it with temperature_report)")
    path = Path(path_dir) / TEMPERATURE_FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (fitted earlier); pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"temperature": float(temperature), **{k: report[k] for k in need}}, indent=2))
    return path


def load_temperature(path_dir: str | Path) -> float | None:
    """T from ``path_dir/temperature.json``, or None when the folder has none."""
    path = Path(path_dir) / TEMPERATURE_FILE
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("temperature")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{path}: 'temperature' must be a positive finite number, got {value!r}")
    return float(value)


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 3 or len(z) == 0:
        raise ValueError(f"logits must have shape (n, 3), got {z.shape}")
    bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
    if len(bad):
        raise ValueError(f"{len(bad)} logit row(s) not finite, at positions {bad[:5].tolist()}")
    y = np.asarray(labels)
    if y.shape != (len(z),) or not np.isin(y, (0, 1, 2)).all():
        raise ValueError(f"labels must be {len(z)} class indices in {{0, 1, 2}}")
    return z, y.astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Ensemble weights
# ---------------------------------------------------------------------------------------------------

BLEND_RULES = {"log": "softmax(Σ w_i log p_i) (geometric; = averaging logits)", "prob": "Σ w_i p_i (arithmetic)"}
_EPS = 1e-15  # log p is taken of p clipped here, as the metric clips


def blend(prob_list: Sequence[np.ndarray], weights: Sequence[float], space: str = "log") -> np.ndarray:
    """The blend of ``prob_list`` with ``weights`` in ``space`` (see ``BLEND_RULES``)."""
    stack, w = _stack(prob_list, space), np.asarray(weights, dtype=np.float64)
    if space == "prob":
        return np.einsum("m,mnk->nk", w, stack)
    return softmax(np.einsum("m,mnk->nk", w, np.log(np.clip(stack, _EPS, 1.0))))


def fit_ensemble_weights(prob_list: Sequence[np.ndarray], labels: np.ndarray, space: str = "log",
                         max_iter: int = 2000) -> tuple[np.ndarray, dict[str, Any]]:
    """Non-negative weights summing to 1 that minimise the log loss of the blend.

    Args:
        prob_list: m arrays (n, 3) of probabilities for the same rows (e.g. softmax of each OOF logits).
        labels: (n,) class indices.
        space: "log" (default): softmax(Σ w_i log p_i), the geometric blend, i.e. averaging logits;
            "prob": Σ w_i p_i.
        max_iter: cap on solver steps (it stops earlier once within 1e-9 of the optimal loss).

    Calibrate each member first (``fit_temperature``): as the weights sum to 1, an over-confident set of
    members can buy softness by giving weight to a poor (even random) member, which is a temperature in
    disguise. Fit a temperature on the blend afterwards if it is still off.
    Returns:
        (weights (m,), info: space, rule, log_loss, member_log_loss, uniform_log_loss, iterations).
    """
    stack = _stack(prob_list, space)
    y = np.asarray(labels).astype(np.int64)
    if y.shape != (stack.shape[1],):
        raise ValueError(f"{len(y)} labels for {stack.shape[1]} rows")
    objective = _log_objective(stack, y) if space == "log" else _prob_objective(stack, y)
    w, iterations = _exponentiated_gradient(objective, len(stack), max_iter)
    m = len(stack)
    candidates = [w, *np.eye(m), np.full(m, 1 / m)]  # never worse than a single member or the uniform blend
    losses = [log_loss(y, blend(stack, c, space)) for c in candidates]
    best = int(np.argmin(losses))
    info = {"space": space, "rule": BLEND_RULES[space], "log_loss": losses[best],
            "member_log_loss": losses[1: m + 1], "uniform_log_loss": losses[-1], "iterations": iterations}
    return np.asarray(candidates[best], dtype=np.float64), info


def _stack(prob_list: Sequence[np.ndarray], space: str) -> np.ndarray:
    if space not in BLEND_RULES:
        raise ValueError(f"space must be one of {list(BLEND_RULES)}, got {space!r}")
    if len(prob_list) == 0:
        raise ValueError("no ensemble members")
    n = len(prob_list[0])
    stack = np.stack([check_probs(p, np.arange(n)) for p in prob_list])
    return stack / stack.sum(axis=2, keepdims=True)


Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


def _log_objective(stack: np.ndarray, y: np.ndarray) -> Objective:
    logp = np.log(np.clip(stack, _EPS, 1.0))  # (m, n, 3)
    rows = np.arange(len(y))

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        q = softmax(np.einsum("m,mnk->nk", w, logp))
        # d/dw_i of −log q_y = −(log p_i[y] − Σ_c q_c log p_i[c])
        grad = -(logp[:, rows, y] - np.einsum("nk,mnk->mn", q, logp)).mean(axis=1)
        return float(-np.log(np.clip(q[rows, y], _EPS, 1.0)).mean()), grad
    return loss_grad


def _prob_objective(stack: np.ndarray, y: np.ndarray) -> Objective:
    py = stack[:, np.arange(len(y)), y]  # (m, n): each member's probability of the truth

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        qy = np.clip(w @ py, _EPS, 1.0)
        return float(-np.log(qy).mean()), -(py / qy).mean(axis=1)
    return loss_grad


def _exponentiated_gradient(loss_grad: Objective, m: int, max_iter: int,
                            tol: float = 1e-9) -> tuple[np.ndarray, int]:
    """Mirror descent on the simplex from the uniform point: w ← w·exp(−η g) / Σ, η adapted by backtracking
    (×1.5 after a step that lowers the loss, ×0.5 and retry otherwise). Both objectives are convex in w, so
    the Frank–Wolfe gap w·g − min(g) bounds the distance to the optimum; it stops once that is < ``tol``."""
    w = np.full(m, 1.0 / m)
    f, g = loss_grad(w)
    eta, it = 1.0, 0
    while it < max_iter and w @ g - g.min() >= tol and eta > 1e-12:
        it += 1
        step = w * np.exp(-eta * (g - g.min()))  # shifted by min(g): same point, no overflow
        step /= step.sum()
        f_new, g_new = loss_grad(step)
        if f_new <= f:
            w, f, g, eta = step, f_new, g_new, eta * 1.5
        else:
            eta *= 0.5
    return w, it


# ---------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------


def calibration_table(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Per class and equal-width probability bin: rows, mean predicted p, observed frequency, gap.

    Bin b holds b/n_bins <= p < (b+1)/n_bins (1.0 falls in the last); empty bins are listed with rows 0.
    """
    p = check_probs(probs, np.arange(len(probs)))
    y = np.asarray(labels).astype(np.int64)
    parts = [_class_bins(p[:, c], (y == c).astype(float), n_bins, name) for c, name in enumerate(CLASSES)]
    return pd.concat(parts, ignore_index=True)


def _class_bins(p: np.ndarray, hit: np.ndarray, n_bins: int, name: str) -> pd.DataFrame:
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / rows
        freq = np.bincount(idx, weights=hit, minlength=n_bins) / rows
    edges = np.arange(n_bins + 1) / n_bins
    return pd.DataFrame({"class": name, "bin": np.arange(n_bins), "lo": edges[:-1], "hi": edges[1:], "rows": rows,
                         "mean_prob": mean_p, "frequency": freq, "gap": freq - mean_p})


def expected_calibration_error(table: pd.DataFrame) -> dict[str, float]:
    """ECE per class from ``calibration_table``: Σ_bins rows/n · |frequency − mean_prob|."""
    out = {}
    for name, part in table.groupby("class", sort=False):
        used = part[part["rows"] > 0]
        out[str(name)] = float((used["rows"] * used["gap"].abs()).sum() / used["rows"].sum())
    return out


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, path: str | Path, n_bins: int = 10) -> Path:
    """Save a reliability diagram (PNG): per class the observed frequency vs mean predicted probability,
    the diagonal, ECE in the legend; below, the rows per bin. Returns ``path``."""
    from matplotlib.figure import Figure

    table = calibration_table(probs, labels, n_bins)
    ece = expected_calibration_error(table)
    fig = Figure(figsize=(6.5, 7.5), dpi=110)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    width = 1 / n_bins / 4
    for c, name in enumerate(CLASSES):
        part = table[(table["class"] == name) & (table["rows"] > 0)]
        top.plot(part["mean_prob"], part["frequency"], marker="o", label=f"{name} (ECE {ece[name]:.3f})")
        all_bins = table[table["class"] == name]
        bottom.bar(all_bins["lo"] + (c + 0.5) * width, all_bins["rows"], width=width, label=name)
    top.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=f"Reliability ({len(probs)} rows)")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted probability", ylabel="rows per bin")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# -- stage reports: what notebooks 01–04, `lmsys evaluate` and the demo's report.md show ---------------------

REPORT_FILE = "evaluation.md"
PLOT_FILE = "plots/reliability.png"


def rows_for(frame: pd.DataFrame, ids: Sequence[Any]) -> pd.DataFrame:
    """``frame``'s rows with these ids, in this order; ids not in the frame are an error naming up to 5."""
    index = pd.Index(frame["id"])
    where = index.get_indexer(list(ids))
    if (where < 0).any():
        missing = [i for i, w in zip(ids, where, strict=True) if w < 0]
        raise ValueError(f"{len(missing)} id(s) not in the data, e.g. {missing[:5]}")
    return frame.iloc[where].reset_index(drop=True)


def model_report(frame: pd.DataFrame, probs: np.ndarray, out_dir: str | Path, title: str,
                 n_tokens: Sequence[int] | None = None, truncated: Sequence[bool] | None = None,
                 max_length: int | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One model's predictions on labelled rows → ``out_dir/evaluation.md`` (overall, ``extra`` lines, the top
    segments, the reliability diagram), ``out_dir/segments.csv`` (every segment) and
    ``out_dir/plots/reliability.png``. Returns the report table, the markdown and the paths."""
    out = Path(out_dir)
    report = segment_report(frame, probs, n_tokens=n_tokens, truncated=truncated, max_length=max_length)
    plot = reliability_diagram(probs, frame["label"].to_numpy(), out / PLOT_FILE)
    report.to_csv(out / "segments.csv", index=False)
    lines = [report_markdown(report, title).rstrip(), *(f"- {line}" for line in extra), "",
             f"![reliability: {title}]({PLOT_FILE})", ""]
    markdown = "\n".join(lines)
    (out / REPORT_FILE).write_text(markdown, encoding="utf-8")
    return {"report": report, "markdown": markdown, "plot": plot, "path": out / REPORT_FILE}


def oof_report(model_dir: str | Path, data: pd.DataFrame, title: str, tokenizer: Any = None,
               pack_cfg: Any = None, fit: bool = True) -> dict[str, Any]:
    """The out-of-fold report of a teacher or student folder (``<model_dir>/oof.parquet``): segments on the
    packed length and truncation when a tokenizer and the training ``pack_cfg`` are given, the reliability
    diagram, and (``fit``) a temperature fitted on the OOF logits, saved as ``<model_dir>/temperature.json``
    (it travels with the merged and quantised model; ``lmsys predict`` applies it)."""
    model_dir = Path(model_dir)
    oof = pd.read_parquet(model_dir / "oof.parquet")
    data = rows_for(data, oof["id"].drop_duplicates().tolist())  # all of train, or a dry run's share
    frame, logits = oof_frame(oof, data)
    n_tokens = truncated = None
    if tokenizer is not None and pack_cfg is not None:
        from .prompting import Packer

        packed = Packer(tokenizer, pack_cfg).pack_frame(frame, progress=True)
        n_tokens, truncated = packed["n_tokens"].to_numpy(), packed["truncated"].to_numpy()
    extra, temperature = [], None
    if fit:
        labels = frame["label"].to_numpy()
        temperature = fit_temperature(logits, labels)
        fitted = temperature_report(logits, labels, temperature, source=str(model_dir / "oof.parquet"))
        save_temperature(model_dir, temperature, fitted, overwrite=True)  # a refit of the same OOF logits
        at_bound = " — at the search bound: the logits carry almost no signal" if temperature >= 19.99 else ""
        extra.append(f"temperature fitted on these OOF logits: T = {temperature:.3f}, log loss "
                     f"{fitted['log_loss_before']:.4f} → {fitted['log_loss_after']:.4f} ({TEMPERATURE_FILE}){at_bound}")
    result = model_report(frame, softmax(logits), model_dir, title, n_tokens=n_tokens, truncated=truncated,
                          max_length=getattr(pack_cfg, "max_length", None), extra=extra)
    return result | {"temperature": temperature}


def folds_report(run_dir: str | Path, cfg: Any, model_dir: str | Path) -> dict[str, Any]:
    """``oof_report`` for a teacher's or student's folds (``cfg``: its ``TeacherConfig``/``DistillConfig``):
    the run's ``data/train.csv``, the model's tokenizer and ``cfg.pack`` for the token-length segments."""
    from .modeling import load_tokenizer
    from .parsing import read_competition
    from .zoo import resolve_model_dir

    data = read_competition(Path(run_dir) / "data" / "train.csv").frame
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model.model_dir))
    return oof_report(model_dir, data, f"{cfg.name} (out of fold)", tokenizer, cfg.pack)


def show(result: dict[str, Any], top: int = 15) -> pd.DataFrame:
    """In a notebook: the reliability diagram, then the top segments (returned, so the cell displays them)."""
    try:
        from IPython.display import Image, display
    except ImportError:
        print(result["markdown"])
    else:
        display(Image(filename=str(result["plot"])))
    return top_segments(result["report"], top)


def run_report(run_dir: str | Path, title: str = "Evaluation") -> Path:
    """``<run>/report.md``: every ``evaluation.md`` of the run (teachers, students, merged, quantised, in the
    chain's order) with its plot links made relative to the run folder."""
    run_dir = Path(run_dir)
    found = [*sorted(run_dir.glob("teachers/*/" + REPORT_FILE)), *sorted(run_dir.glob("student/*/" + REPORT_FILE)),
             *[run_dir / d / REPORT_FILE for d in ("merged", "quantized") if (run_dir / d / REPORT_FILE).is_file()]]
    parts = [f"# {title}: {run_dir.name}", "",
             "Where the log loss goes, model by model: the segments contributing most loss above the overall "
             "mean, and the reliability diagram (calibration per class). `segments.csv` beside each section "
             "holds every segment.", ""]
    for path in found:
        folder = path.parent.relative_to(run_dir).as_posix()
        text = path.read_text(encoding="utf-8").replace(f"]({PLOT_FILE})", f"]({folder}/{PLOT_FILE})")
        parts += [text, f"(from `{folder}/`)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def read_predictions(pred: str | Path, data: pd.DataFrame, teacher: str | None = None,
                     ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """A predictions file (parquet or CSV) joined to ``data`` by id: OOF logits (``logit_a, logit_b,
    logit_tie``) or probabilities (a submission's ``winner_model_a, winner_model_b, winner_tie``).
    Returns (rows in the file's order, probabilities, logits or None)."""
    from .parsing import LABEL_COLUMNS

    path = Path(pred)
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if all(c in table.columns for c in LOGIT_COLUMNS):
        frame, logits = oof_frame(table, data, teacher=teacher)
        return frame, softmax(logits), logits
    if all(c in table.columns for c in LABEL_COLUMNS) and "id" in table.columns:
        frame = rows_for(data, table["id"].tolist())
        probs = check_probs(table[list(LABEL_COLUMNS)].to_numpy(dtype=float), frame["id"].tolist())
        return frame, probs, None
    raise ValueError(f"{path}: needs id + {list(LOGIT_COLUMNS)} (OOF logits) or id + {list(LABEL_COLUMNS)} "
                     f"(probabilities); it has {list(table.columns)}")
