"""``lmsys prepare``: a run folder's data from the competition files — validated, de-duplicated, split.

Contract (what every later stage reads, without path flags):
- ``RUN/data/train.csv``: the rows the stages train on — valid rows of ``train.csv``, each conversation once
  (the same prompt and responses in either A/B order count as one; the first copy is kept), the holdout
  removed. Competition dialect, so any reader of the competition file reads it.
- ``RUN/data/folds.parquet`` (id, fold): prompt-grouped folds of those rows (rows sharing a normalised prompt
  share a fold, ``parsing.grouped_folds``).
- ``RUN/data/holdout.csv``: a prompt-grouped share of the rows that no stage trains on (merge and quantisation
  fidelity, evaluation, the final temperature). No prompt of the holdout appears in ``train.csv``.
- ``RUN/data/extra.csv`` (when ``--extra`` files are given): extra preference data for post-pretraining, read
  with ``parsing.read_extra``, de-duplicated, without any conversation of train or holdout (it would leak labels
  into the folds or the holdout); a teacher or student names it as ``pretrain.data = ["data/extra.csv"]``.
- ``RUN/data/prepare.json``: what was read, kept and dropped, and why; ``RUN/config/prepare.json``: the
  identity of the split (content hashes of the inputs, folds, holdout, seed — never their paths), so the same
  inputs prepared on another node match, and other inputs are refused unless forced.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import parsing
from .config import StageConflictError, claim_stage, save_stage

STAGE = "prepare"


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    run_dir: Path
    report: dict[str, Any]
    skipped: bool  # True: the run folder already held this split


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def holdout_mask(frame: pd.DataFrame, share: float, seed: int) -> np.ndarray:
    """Rows of a prompt-grouped holdout of about ``share`` of the rows (whole prompt groups, shuffled with
    ``seed``, taken until the share is reached; at least one group when ``share`` > 0)."""
    if share <= 0:
        return np.zeros(len(frame), dtype=bool)
    codes, uniques = pd.factorize(frame["prompt"].map(parsing.prompt_key))
    sizes = np.bincount(codes, minlength=len(uniques))
    order = np.random.default_rng(seed).permutation(len(uniques))
    taken = np.cumsum(sizes[order])
    n_groups = max(1, int(np.searchsorted(taken, share * len(frame), side="left")) + 1)
    if n_groups >= len(uniques):
        raise ValueError(f"a holdout of {share:.1%} would take every prompt group ({len(uniques)}): lower --holdout")
    chosen = np.zeros(len(uniques), dtype=bool)
    chosen[order[:n_groups]] = True
    return chosen[codes]


def prepare(run_dir: str | Path, train_csv: str | Path, extra: Sequence[str | Path] = (), folds: int = 5,
            holdout: float = 0.05, seed: int = 42, share: float = 1.0, force: bool = False,
            log: Callable[[str], None] = print) -> PrepareResult:
    """Write ``RUN/data/`` from ``train_csv`` (and ``extra`` files); see the module docstring.

    ``share`` < 1 keeps that share of the prompt groups (seeded), before everything else — a rehearsal run on
    less data (the prototype recipe) that is complete in itself: folds, OOF logits and holdout.

    Re-running with the same inputs and settings is a no-op; other inputs in the same run folder raise
    ``StageConflictError`` unless ``force``. Bad rows of ``train_csv`` raise ``parsing.DataError`` naming each
    row and field (nothing is dropped silently: fix the file, or the reader's warning says what it repaired).
    """
    if not 0.0 <= holdout < 0.5:
        raise ValueError(f"holdout must be in [0, 0.5), got {holdout}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    run_dir = Path(run_dir)
    identity = {"train_sha256": file_sha256(train_csv), "extra_sha256": [file_sha256(p) for p in extra],
                "folds": folds, "holdout": holdout, "seed": seed, "share": share}
    data = run_dir / "data"
    outputs = [data / n for n in ("train.csv", "folds.parquet", "holdout.csv", "prepare.json")]
    outputs += [data / "extra.csv"] if extra else []
    try:
        if not claim_stage(run_dir, STAGE, identity, force=force) and all(p.exists() for p in outputs):
            report = json.loads((data / "prepare.json").read_text(encoding="utf-8"))
            log(f"{run_dir}: already prepared from the same files and settings — kept")
            return PrepareResult(run_dir, report, True)
    except StageConflictError:
        raise StageConflictError(f"{run_dir} was prepared from other files or settings "
                                 f"({run_dir / 'config' / 'prepare.json'}): use another run folder, or "
                                 "--force to replace its data (its trained stages then no longer match)") from None
    report = _write(data, train_csv, extra, folds, holdout, seed, share, log)
    save_stage(run_dir, STAGE, identity)
    return PrepareResult(run_dir, report, False)


def _write(data: Path, train_csv: str | Path, extra: Sequence[str | Path], folds: int, holdout: float, seed: int,
           share: float, log: Callable[[str], None]) -> dict[str, Any]:
    result = parsing.read_competition(train_csv, kind="train")
    for problem in result.warnings[:20]:
        log(f"warning {problem}")
    frame = result.frame
    if share < 1.0:
        frame = frame.loc[holdout_mask(frame, share, seed + 1)].reset_index(drop=True)
        log(f"share {share:.1%} of the prompt groups: {len(frame)} of {len(result.frame)} rows kept")
    kept, dedup = parsing.deduplicate(frame)
    held = holdout_mask(kept, holdout, seed)
    train, hold = kept.loc[~held].reset_index(drop=True), kept.loc[held].reset_index(drop=True)
    fold_of = parsing.grouped_folds(train, folds, seed)
    data.mkdir(parents=True, exist_ok=True)
    parsing.write_table(_raw(train_csv, train["id"]), data / "train.csv")
    parsing.write_table(_raw(train_csv, hold["id"]), data / "holdout.csv")
    pd.DataFrame({"id": train["id"], "fold": fold_of.astype(np.int64)}).to_parquet(data / "folds.parquet")
    report = {"source_rows": len(result.frame), "share": share, "share_rows": len(frame),
              "warnings": len(result.warnings),
              "duplicates_dropped": dedup["dropped"], "duplicate_label_conflicts": dedup["label_conflicts"],
              "train_rows": len(train), "holdout_rows": len(hold), "folds": folds,
              "fold_sizes": np.bincount(fold_of, minlength=folds).tolist(), "seed": seed}
    log(f"{train_csv}: {len(frame)} rows; dropped {dedup['dropped']} repeated conversations (same prompt and "
        f"responses in either A/B order; {dedup['label_conflicts']} of them with another label: the first copy "
        f"kept); {len(hold)} rows ({holdout:.1%} by prompt group) → holdout.csv, never trained on; "
        f"{len(train)} rows in {folds} prompt-grouped folds {report['fold_sizes']}")
    if extra:
        report |= _write_extra(data, extra, kept, log)
    (data / "prepare.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _raw(path: str | Path, ids: pd.Series) -> pd.DataFrame:
    """The source file's own rows (every column, cells as written) for ``ids``, in that order."""
    raw = parsing.read_table(path)
    parsed, _ = parsing.parse_ids(raw["id"])
    position = pd.Series(np.arange(len(raw)), index=parsed.to_numpy())
    position = position[~position.index.duplicated(keep="first")]
    return raw.iloc[position.loc[ids.to_numpy()].to_numpy()].reset_index(drop=True)


def _write_extra(data: Path, extra: Sequence[str | Path], competition: pd.DataFrame,
                 log: Callable[[str], None]) -> dict[str, Any]:
    frames = [parsing.read_extra(path).frame for path in extra]
    rows = sum(len(f) for f in frames)
    if len(frames) > 1:  # ids need only be unique within a file: name each by its file when they collide
        every = pd.concat([f["id"].astype(str) for f in frames], ignore_index=True)
        if every.duplicated().any():
            frames = [f.assign(id=f"{Path(p).stem}-" + f["id"].astype(str)) for f, p in zip(frames, extra)]
    joined = pd.concat(frames, ignore_index=True)
    joined, overlap = parsing.drop_overlap(joined, competition)
    joined, dedup = parsing.deduplicate(joined)
    columns = ["id", "model_a", "model_b", "prompt", "response_a", "response_b"]
    out = joined[[c for c in columns if c in joined.columns]].copy()
    for column in ("prompt", "response_a", "response_b"):
        out[column] = out[column].map(parsing.encode_cell)
    onehot = parsing.labels_to_onehot(joined["label"].to_numpy())
    for j, name in enumerate(parsing.LABEL_COLUMNS):
        out[name] = onehot[:, j]
    parsing.write_table(out, data / "extra.csv")
    log(f"extra data {[str(p) for p in extra]}: {rows} rows; dropped {overlap} that repeat a train or holdout "
        f"conversation (their labels would leak into the folds) and {dedup['dropped']} duplicates; "
        f"{len(out)} rows → extra.csv (post-pretraining: pretrain.data = [\"data/extra.csv\"])")
    return {"extra_rows_read": rows, "extra_overlap_dropped": overlap, "extra_duplicates_dropped": dedup["dropped"],
            "extra_rows": len(out)}
