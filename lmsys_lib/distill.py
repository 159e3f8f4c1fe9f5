"""Student stage: k-fold distillation from the teachers' out-of-fold logits.

Contract:
- The student trains fold k on the rows of the other folds with ``losses.distill_sum`` against the
  teachers' OOF logits for those rows (each OOF logit comes from a teacher fold model that never saw that
  row, so the student is not handed the teacher's memorised label of the row it learns from). That teacher
  fold model did train on the student's held-out fold, though, so some of those rows' labels reach the student
  indirectly: its held-out (and OOF) log loss can be slightly optimistic — judge the final model on rows no
  stage trained on (the demo's ``holdout.csv``). Same split, same loop as the teachers:
  ``teacher.train_folds`` with another loss — there is no second training loop.
- Teacher logits are joined by id and validated first: an id missing from a teacher, or present twice, is
  an error naming the ids (``allow_missing_teacher_rows`` masks absent rows out of that teacher's term).
- A/B swap augmentation permutes the teacher logits of a swapped row exactly as its label (``AB_SWAP``).
- Output: ``student/<name>/fold<k>/adapter`` (best held-out log loss), ``eval_logits.parquet``, and
  ``student/<name>/oof.parquet``. ``teachers = ()`` trains the same student on hard labels only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import losses, parsing, teacher
from .config import DistillConfig, ModelConfig
from .train import TrainData


def student_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "student" / name


def run(run_dir: str | Path, cfg: DistillConfig, log: Callable[[str], None] = print) -> Path:
    """Train the student's folds; returns ``student/<name>/oof.parquet`` (or the folder for a partial run)."""
    frame, _ = teacher.load_split(run_dir)
    table = teacher_table(run_dir, cfg.teachers, frame["id"].to_numpy(), cfg.allow_missing_teacher_rows)

    def body(model_cfg: ModelConfig, accelerator: Any, quiet: Callable[[str], None]) -> Path:
        if cfg.teachers:
            quiet(f"[{cfg.name}] distilling from {', '.join(cfg.teachers)} ({cfg.loss}, T = {cfg.temperature})")
        return teacher.train_folds(run_dir, cfg.name, model_cfg, cfg.train, cfg.pack, folds=cfg.folds or None,
                                   fraction=cfg.fraction, log=quiet, accelerator=accelerator,
                                   root=student_dir(run_dir, cfg.name),
                                   loss_for=(lambda data: make_loss(table, data, cfg)) if cfg.teachers else None)

    return teacher.run_fold_stage(run_dir, cfg, student_dir(run_dir, cfg.name) / "student_config.json",
                                  f"student-{cfg.name}", body, log)


class TeacherTable:
    """Teacher logits aligned to train ids: ``logits`` (n, t, 3) and ``mask`` (n, t), row i ↔ ``ids[i]``."""

    def __init__(self, ids: np.ndarray, logits: np.ndarray, mask: np.ndarray, names: tuple[str, ...]):
        self.ids, self.logits, self.mask, self.names = ids, logits, mask, names
        self.position = pd.Series(np.arange(len(ids)), index=ids)

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = self.position.loc[ids].to_numpy()
        return self.logits[idx], self.mask[idx]


def teacher_table(run_dir: str | Path, names: tuple[str, ...] | list[str], ids: np.ndarray,
                  allow_missing: bool = False) -> TeacherTable:
    """Read and validate each teacher's ``oof.parquet`` against the train ``ids``.

    Errors name the teacher, the file and the ids: duplicated, unknown, non-finite — and missing, unless
    ``allow_missing`` (then the row's entry is masked).
    """
    logits = np.zeros((len(ids), len(names), 3), dtype=np.float32)
    mask = np.zeros((len(ids), len(names)), dtype=bool)
    position = pd.Series(np.arange(len(ids)), index=ids)
    for j, name in enumerate(names):
        path = teacher.teacher_dir(run_dir, name) / "oof.parquet"
        if not path.exists():
            raise FileNotFoundError(f"teacher '{name}' has no OOF logits ({path}): run its teacher stage first")
        oof = pd.read_parquet(path)
        source = f"teacher {name} ({path})"
        if allow_missing:
            present = oof["id"].isin(position.index)
            teacher.check_oof(oof, oof.loc[present, "id"].to_numpy(), source=source)
        else:
            teacher.check_oof(oof, ids, source=source)
        idx = position.loc[oof["id"]].to_numpy()
        logits[idx, j] = oof[["logit_a", "logit_b", "logit_tie"]].to_numpy(np.float32)
        mask[idx, j] = True
    return TeacherTable(ids, logits, mask, tuple(names))


def make_loss(table: TeacherTable, data: TrainData, cfg: DistillConfig) -> Any:
    """The fold's training loss for ``train.fit``: distillation against the teachers' logits of its rows."""
    import torch

    logits, mask = table.rows(data.row_ids)
    weights = cfg.teacher_weights or None
    swap = list(parsing.AB_SWAP)

    def loss_fn(student_logits: Any, labels: Any, rows: np.ndarray, swapped: np.ndarray) -> Any:
        t = logits[rows].copy()
        t[swapped] = t[swapped][:, :, swap]  # a swapped row's teacher distribution, permuted like its label
        return losses.distill_sum(student_logits, labels, torch.from_numpy(t), torch.from_numpy(mask[rows]),
                                  weights=weights, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                                  mode=cfg.loss)

    return loss_fn


def comparison(run_dir: str | Path, teachers: list[str] | tuple[str, ...],
               students: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Out-of-fold log loss of teachers and students side by side (every train row, each scored by the fold
    model that did not train on it); models whose folds are not all done are listed with NaN."""
    from .metrics import accuracy, log_loss, softmax

    frame, _ = teacher.load_split(run_dir)
    labels = frame["label"].to_numpy()
    rows = []
    for kind, names, folder in (("teacher", teachers, teacher.teacher_dir), ("student", students, student_dir)):
        for name in names:
            path = folder(run_dir, name) / "oof.parquet"
            row = {"model": name, "role": kind, "oof_log_loss": np.nan, "oof_accuracy": np.nan}
            if path.exists():
                oof = pd.read_parquet(path)
                teacher.check_oof(oof, frame["id"].to_numpy(), source=str(path))
                probs = softmax(oof.set_index("id").loc[frame["id"], ["logit_a", "logit_b", "logit_tie"]].to_numpy())
                row |= {"oof_log_loss": log_loss(labels, probs), "oof_accuracy": accuracy(labels, probs)}
            rows.append(row)
    rows.append({"model": "uniform guess", "role": "reference", "oof_log_loss": float(np.log(3)),
                 "oof_accuracy": np.nan})
    return pd.DataFrame(rows)
