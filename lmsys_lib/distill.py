"""Student stage: k-fold distillation from the run's teachers, on the teachers' folds.

Contract:
- The student trains fold k on the rows of the other folds with ``losses.distill_sum`` against teacher
  logits for those rows. ``targets = "in_fold"`` (default, the first place's pipeline): the logits of
  teacher fold k on its own training rows (``teachers/<t>/fold<k>/train_logits.parquet``) — teacher fold k
  never saw fold k, so no label of the student's held-out fold reaches student fold k, and its held-out and
  OOF log loss are honest. ``targets = "oof"``: the teachers' OOF logits (each from the teacher fold that did
  not train on that row — but that fold trained on the student's held-out rows, so their labels leak in and
  the student's held-out loss is optimistic). Same split, same loop as the teachers: ``teacher.train_folds``
  with another loss — there is no second training loop.
- Teacher logits are joined by id and validated first: an id missing from a teacher, or present twice, is
  an error naming the ids (``allow_missing_teacher_rows`` masks absent rows out of that teacher's term); in-fold
  logits that include a row of the student's held-out fold (the teacher was trained on other folds) are an
  error naming the teacher, the fold and the rows.
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


def run(run_dir: str | Path, cfg: DistillConfig, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Train the student's folds; returns ``student/<name>/oof.parquet`` (or the folder for a partial run).
    ``force``: the folds it runs are trained again from scratch."""
    frame, fold_of = teacher.load_split(run_dir)
    root = student_dir(run_dir, cfg.name)

    # OOF targets: one table for every fold, validated before any model loads
    oof = teacher_table(run_dir, cfg.teachers, frame["id"].to_numpy(), cfg.allow_missing_teacher_rows) \
        if cfg.teachers and cfg.targets == "oof" else None

    def loss_for(fold: int, data: TrainData) -> Any:
        held = frame["id"].to_numpy()[fold_of == fold]
        table = oof if oof is not None else in_fold_table(run_dir, cfg.teachers, fold, data.row_ids, held,
                                                             cfg.allow_missing_teacher_rows)
        return make_loss(table, data, cfg)

    def body(model_cfg: ModelConfig, accelerator: Any, quiet: Callable[[str], None]) -> Path:
        if cfg.teachers:
            quiet(f"[{cfg.name}] distilling from {', '.join(cfg.teachers)} ({cfg.loss}, T = {cfg.temperature}, "
                  f"targets {cfg.targets})")
        model_cfg = teacher.pretrained_base(run_dir, root, cfg, model_cfg, quiet, accelerator)
        stage = teacher.stage_identity(cfg)
        return teacher.train_folds(run_dir, cfg.name, model_cfg, cfg.train, cfg.pack, folds=cfg.folds or None,
                                   fraction=cfg.fraction, log=quiet, accelerator=accelerator, root=root,
                                   loss_for=loss_for if cfg.teachers else None,
                                   fold_identity=lambda fold: {"stage": stage,
                                                               "targets_sha256": targets_sha256(run_dir, cfg, fold)})

    return teacher.run_fold_stage(run_dir, cfg, root / "student_config.json", f"student-{cfg.name}", body, log,
                                  force)


def targets_sha256(run_dir: str | Path, cfg: DistillConfig, fold: int) -> dict[str, str]:
    """The content of the teacher logits student fold ``fold`` learns from, per teacher: a retrained or
    re-imported teacher makes the fold's old training stale (refused, not reused)."""
    from .prepare import file_sha256

    def source(name: str) -> Path:
        folder = teacher.teacher_dir(run_dir, name)
        return folder / (f"fold{fold}/train_logits.parquet" if cfg.targets == "in_fold" else "oof.parquet")

    return {name: file_sha256(source(name)) for name in cfg.teachers if source(name).exists()}


def targets_for(run_dir: str | Path, cfg: DistillConfig, fold: int, ids: np.ndarray,
                held_out: np.ndarray) -> TeacherTable:
    """Student fold ``fold``'s teacher logits for its training rows ``ids`` (``cfg.targets``)."""
    if cfg.targets == "oof":
        frame, _ = teacher.load_split(run_dir)
        return teacher_table(run_dir, cfg.teachers, frame["id"].to_numpy(), cfg.allow_missing_teacher_rows)
    return in_fold_table(run_dir, cfg.teachers, fold, ids, held_out, cfg.allow_missing_teacher_rows)


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


def in_fold_table(run_dir: str | Path, names: tuple[str, ...] | list[str], fold: int, ids: np.ndarray,
                  held_out: np.ndarray, allow_missing: bool = False) -> TeacherTable:
    """Teacher fold ``fold``'s logits on its own training rows, aligned to the student's training ``ids``.

    Errors name the teacher, the file and the ids: a row of the student's held-out fold (``held_out``) among
    the teacher fold's training rows (the teacher used other folds: a leak), duplicated or non-finite logits,
    and — unless ``allow_missing`` — student training rows the teacher fold did not score.
    """
    logits = np.zeros((len(ids), len(names), 3), dtype=np.float32)
    mask = np.zeros((len(ids), len(names)), dtype=bool)
    position = pd.Series(np.arange(len(ids)), index=ids)
    for j, name in enumerate(names):
        path = teacher.teacher_dir(run_dir, name) / f"fold{fold}" / "train_logits.parquet"
        if not path.exists():
            raise FileNotFoundError(f"teacher '{name}' has no in-fold logits for fold {fold} ({path}): train its "
                                    f"fold {fold} first (lmsys teacher --folds {fold}), import them (lmsys "
                                    "import-logits), or distil from the OOF logits (targets = \"oof\")")
        table = pd.read_parquet(path)
        source = f"teacher {name} fold {fold} ({path})"
        leaked = sorted(set(table["id"].tolist()) & set(np.asarray(held_out).tolist()))
        if leaked:
            raise ValueError(f"{source}: trained on {len(leaked)} row(s) of the student's held-out fold {fold} "
                             f"(ids {leaked[:10]}): teacher and student must share the run's folds")
        present = table["id"].isin(position.index)
        want = table.loc[present, "id"].to_numpy() if allow_missing else ids
        teacher.check_oof(table.loc[present].assign(fold=fold, teacher=name), want, source=source)
        idx = position.loc[table.loc[present, "id"]].to_numpy()
        logits[idx, j] = table.loc[present, ["logit_a", "logit_b", "logit_tie"]].to_numpy(np.float32)
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
