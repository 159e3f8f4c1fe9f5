"""Teacher stage: k-fold training and out-of-fold (OOF) logits, optionally after a post-pretrain stage.

Contract:
- ``train_folds`` trains one model per fold k on the rows whose fold != k, keeps the adapter with the best
  log loss on fold k, and records that adapter's logits for every row of fold k. The teacher's
  ``oof.parquet`` (id, fold, logit_a, logit_b, logit_tie, teacher) then holds exactly one row per training
  id, from the one fold model that did not see it — ``check_oof`` enforces it on write and on read.
- Several teachers live side by side under ``<run>/teachers/<name>/``; ``read_oof`` stacks them.
- ``post_pretrain`` trains on extra preference data first and merges that adapter into the base (in fp32,
  one cast at the end) as a plain checkpoint, which fold training then starts from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import parsing, train
from .config import ModelConfig, PackConfig, PretrainConfig, TrainConfig

OOF_COLUMNS = ("id", "fold", "logit_a", "logit_b", "logit_tie", "teacher")


def run(run_dir: str | Path, cfg: Any, log: Callable[[str], None] = print) -> Path:
    """Run a ``TeacherConfig`` in ``run_dir``; returns ``oof.parquet`` (or the teacher folder for a partial
    run). The config is saved beside the output; another config for the same teacher name is refused.

    With ``cfg.pretrain.data`` the teacher is first post-pretrained on that extra data and its folds start
    from the merged checkpoint (``teachers/<name>/pretrained/merged``); a finished post-pretraining is reused.
    """

    def body(model_cfg: ModelConfig, accelerator: Any, quiet: Callable[[str], None]) -> Path:
        if cfg.pretrain.data:
            pre = post_pretrain(run_dir, cfg.name, cfg.pretrain, model_cfg, cfg.pack, log=quiet,
                                accelerator=accelerator)
            model_cfg = dataclasses.replace(model_cfg, model_dir=str(pre.model_dir))
        return train_folds(run_dir, cfg.name, model_cfg, cfg.train, cfg.pack, folds=cfg.folds or None,
                           fraction=cfg.fraction, log=quiet, accelerator=accelerator)

    return run_fold_stage(run_dir, cfg, teacher_dir(run_dir, cfg.name) / "teacher_config.json",
                          f"teacher-{cfg.name}", body, log)


def run_fold_stage(run_dir: str | Path, cfg: Any, saved: Path, stage: str,
                   body: Callable[[ModelConfig, Any, Callable[[str], None]], Path],
                   log: Callable[[str], None] = print) -> Path:
    """The frame shared by the k-fold stages (teacher, student) under one ``accelerate`` process group.

    Saves ``cfg`` (less ``folds``: which folds run now may vary between sessions) at ``saved`` and refuses
    another config there; resolves a ``zoo:`` model once (main process first); runs ``body(model_cfg,
    accelerator, log)``; records the stage as done when it returns an ``oof.parquet``.
    """
    from accelerate import Accelerator

    from .config import save_stage, to_dict
    from .zoo import resolve_model_dir

    accelerator = Accelerator()
    main = accelerator.is_main_process
    try:
        identity = {k: v for k, v in to_dict(cfg).items() if k != "folds"}
        if saved.exists() and json.loads(saved.read_text(encoding="utf-8")) != identity:
            raise ValueError(f"{saved} holds another config for '{cfg.name}': use another name or run folder")
        if main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_name(saved.name + ".tmp")
            tmp.write_text(json.dumps(identity, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(tmp, saved)  # atomic: another process never reads half a file
            resolve_model_dir(cfg.model.model_dir)  # a zoo model is converted once, by one process
        accelerator.wait_for_everyone()
        model_cfg = dataclasses.replace(cfg.model, model_dir=resolve_model_dir(cfg.model.model_dir))
        out = body(model_cfg, accelerator, log if main else (lambda _: None))
        if main and out.name == "oof.parquet":
            save_stage(run_dir, stage, cfg)
        return out
    finally:
        # Tear the process group down before interpreter exit: a gloo group left to the garbage
        # collector can abort a rank ("terminate called without an active exception").
        accelerator.end_training()


def teacher_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "teachers" / name


def load_split(run_dir: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's train rows and their fold indices (validated: every train id has exactly one fold)."""
    run_dir = Path(run_dir)
    frame = parsing.read_competition(run_dir / "data" / "train.csv").frame
    folds = pd.read_parquet(run_dir / "data" / "folds.parquet")
    if folds["id"].duplicated().any() or set(folds["id"]) != set(frame["id"]):
        raise ValueError(f"{run_dir}/data/folds.parquet does not give exactly one fold per train id "
                         "(made by the folds stage: re-run it)")
    fold_of = dict(zip(folds["id"], folds["fold"]))
    return frame, np.array([fold_of[i] for i in frame["id"]])


def train_folds(run_dir: str | Path, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig,
                pack_cfg: PackConfig, folds: Sequence[int] | None = None, fraction: float = 1.0,
                log: Callable[[str], None] = print, accelerator: Any = None, root: Path | None = None,
                loss_for: Callable[[train.TrainData], Any] | None = None) -> Path:
    """Train the given folds (default: all) of model ``name``; write ``oof.parquet`` once all exist.

    ``fraction`` < 1 trains and evaluates on that share of each fold (a dry run); the OOF file is only
    written for a full run, since a partial one cannot cover every id. ``root`` is the model's folder
    (default ``teachers/<name>``); ``loss_for(fold_train_data)`` gives a fold's training loss (default:
    cross-entropy) — the student stage passes its distillation loss here, so both share one loop.
    """
    from .modeling import load_tokenizer
    from .prompting import Packer

    root = Path(root) if root is not None else teacher_dir(run_dir, name)
    frame, fold_of = load_split(run_dir)
    if fraction < 1.0:
        keep = np.random.default_rng(train_cfg.seed).random(len(frame)) < fraction
        frame, fold_of = frame.loc[keep].reset_index(drop=True), fold_of[keep]
    data = train.pack_for_training(Packer(load_tokenizer(model_cfg.model_dir), pack_cfg), frame)
    k = int(fold_of.max()) + 1
    for fold in (range(k) if folds is None else folds):
        out = root / f"fold{fold}"
        if (out / "metrics.json").exists() and (out / "eval_logits.parquet").exists():
            log(f"[{name}] fold {fold} already trained — skipped")
            continue
        log(f"[{name}] fold {fold}: {int((fold_of != fold).sum())} train rows, {int((fold_of == fold).sum())} held out")
        fold_train = data.subset(fold_of != fold)
        train.fit(model_cfg, train_cfg, fold_train, data.subset(fold_of == fold), out, log=log,
                  accelerator=accelerator, loss_fn=loss_for(fold_train) if loss_for else None)
    finished = all((root / f"fold{f}" / "metrics.json").exists() for f in range(k))  # eval_logits exist mid-fold
    if fraction >= 1.0 and finished:
        if accelerator is None or accelerator.is_main_process:
            write_oof(root, name, frame["id"].to_numpy(), k)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return root / "oof.parquet"
    return root


def write_oof(root: Path, name: str, ids: np.ndarray, k: int) -> Path:
    """Gather the folds' held-out logits into ``root/oof.parquet`` and check every id is there exactly once."""
    parts = []
    for fold in range(k):
        part = pd.read_parquet(root / f"fold{fold}" / "eval_logits.parquet")
        parts.append(part.assign(fold=fold, teacher=name))
    oof = pd.concat(parts, ignore_index=True)[list(OOF_COLUMNS)]
    check_oof(oof, ids, source=f"{name} ({root})")
    path = root / "oof.parquet"
    oof.to_parquet(path)
    return path


def check_oof(oof: pd.DataFrame, ids: np.ndarray, source: str = "oof") -> None:
    """Every id of ``ids`` exactly once, nothing else, finite logits; errors name the ids."""
    missing = [c for c in OOF_COLUMNS if c not in oof.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}")
    counts = oof["id"].value_counts()
    dup = counts[counts > 1].index.tolist()
    absent = sorted(set(np.asarray(ids).tolist()) - set(oof["id"].tolist()))
    extra = sorted(set(oof["id"].tolist()) - set(np.asarray(ids).tolist()))
    bad = oof.loc[~np.isfinite(oof[["logit_a", "logit_b", "logit_tie"]].to_numpy()).all(axis=1), "id"].tolist()
    problems = [f"{label} ids {vals[:10]}{' …' if len(vals) > 10 else ''}"
                for label, vals in (("duplicated", dup), ("missing", absent), ("unknown", extra),
                                    ("non-finite logits for", bad)) if vals]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def read_oof(run_dir: str | Path, names: Sequence[str], ids: np.ndarray) -> pd.DataFrame:
    """The OOF logits of several teachers, each validated against ``ids``, stacked."""
    frames = []
    for name in names:
        oof = pd.read_parquet(teacher_dir(run_dir, name) / "oof.parquet")
        check_oof(oof, ids, source=f"teacher {name} ({teacher_dir(run_dir, name)}/oof.parquet)")
        frames.append(oof)
    return pd.concat(frames, ignore_index=True)


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    model_dir: Path
    metrics: dict[str, Any]


def post_pretrain(run_dir: str | Path, name: str, cfg: PretrainConfig, model_cfg: ModelConfig,
                  pack_cfg: PackConfig, log: Callable[[str], None] = print, accelerator: Any = None) -> PretrainResult:
    """Train on extra preference data (e.g. UltraFeedback-derived) and merge into a new base checkpoint.

    The extra files are read with ``parsing.read_extra``; conversations that are also in the run's train
    rows are dropped (they would leak labels into the folds that hold them out). The adapter is trained
    like a fold (resumable), then merged in fp32 into ``teachers/<name>/pretrained/merged`` — pass that
    folder as ``model_dir`` to ``train_folds``. A finished merge is reused.
    """
    from .modeling import load_tokenizer
    from .prompting import Packer

    out = teacher_dir(run_dir, name) / "pretrained"
    merged = out / ("adapter" if model_cfg.lora_r == 0 else "merged")  # full fine-tuning saves a checkpoint
    if (merged / "config.json").exists() and (out / "metrics.json").exists():
        log(f"[{name}] post-pretraining already done — starting the folds from {merged}")
        return PretrainResult(merged, json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    extra = pd.concat([parsing.read_extra(path, seed=cfg.seed).frame for path in cfg.data], ignore_index=True)
    train_rows = parsing.read_competition(Path(run_dir) / "data" / "train.csv").frame
    extra, overlap = parsing.drop_overlap(extra, train_rows)
    extra, dedup = parsing.deduplicate(extra)
    if len(extra) < 2:
        raise ValueError(f"post-pretraining data {list(cfg.data)}: {len(extra)} rows left after dropping "
                         f"{overlap} that repeat train rows and {dedup['dropped']} duplicates")
    log(f"[{name}] post-pretraining on {len(extra)} extra rows ({overlap} repeating train rows and "
        f"{dedup['dropped']} duplicates dropped)")
    tokenizer = load_tokenizer(model_cfg.model_dir)
    data = train.pack_for_training(Packer(tokenizer, pack_cfg), extra)
    held = np.random.default_rng(cfg.train.seed).random(len(extra)) < cfg.held_out_share
    held[0], held[-1] = True, False  # at least one row on each side
    metrics = train.fit(model_cfg, cfg.train, data.subset(~held), data.subset(held), out, log=log,
                        accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        merge_adapter_into_base(model_cfg, out / "adapter", merged, tokenizer, log=log)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return PretrainResult(merged, metrics)


def merge_adapter_into_base(model_cfg: ModelConfig, adapter_dir: Path, out_dir: Path, tokenizer: Any,
                            log: Callable[[str], None] = print) -> Path:
    """base + adapter → a plain checkpoint: ``merge.merge_exact`` with one adapter — merged in fp32 (bf16
    merging moved logits by 0.4 on a real 270M model), cast once, streamed tensor by tensor (a 70B base is
    never loaded whole), saved as safetensors with the tokenizer."""
    from .merge import merge_exact

    if model_cfg.lora_r == 0:  # full fine-tuning already saved a plain checkpoint
        return adapter_dir
    return merge_exact(model_cfg.model_dir, [adapter_dir], out_dir, tokenizer=tokenizer, log=log)


def prepare_run(run_dir: str | Path, data_dir: str | Path, k: int = 5, seed: int = 42) -> Path:
    """Make a run folder from competition data: ``data/train.csv`` (a copy) and grouped ``folds.parquet``.

    Re-running with the same data and (k, seed) is a no-op; other folds in the same folder are refused.
    """
    import shutil

    from .config import FoldConfig, claim_stage, save_stage

    run_dir, cfg = Path(run_dir), FoldConfig(k=k, seed=seed)
    if not claim_stage(run_dir, "folds", cfg):
        return run_dir
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    source = Path(data_dir) / "train.csv"
    if source.resolve() != (run_dir / "data" / "train.csv").resolve():
        shutil.copyfile(source, run_dir / "data" / "train.csv")
    parsing.write_folds(run_dir / "data" / "train.csv", run_dir / "data" / "folds.parquet", k, seed)
    save_stage(run_dir, "folds", cfg)
    return run_dir


def fold_report(run_dir: str | Path, name: str, root: Path | None = None) -> pd.DataFrame:
    """Per trained fold: best held-out log loss, its step, steps run; plus the OOF log loss when complete.
    ``root``: the model's folder (default ``teachers/<name>``; a student's is ``student/<name>``)."""
    from .metrics import log_loss, softmax

    root = Path(root) if root is not None else teacher_dir(run_dir, name)
    rows = []
    for path in sorted(root.glob("fold*/metrics.json")):
        m = json.loads(path.read_text(encoding="utf-8"))
        rows.append({"fold": path.parent.name, "best_log_loss": m["best_eval_log_loss"],
                     "best_step": m["best_step"], "steps": m["steps"]})
    oof_path = root / "oof.parquet"
    if oof_path.exists():
        frame, _ = load_split(run_dir)
        oof = pd.read_parquet(oof_path).set_index("id").loc[frame["id"]]
        loss = log_loss(frame["label"].to_numpy(), softmax(oof[["logit_a", "logit_b", "logit_tie"]].to_numpy()))
        rows.append({"fold": "all (OOF)", "best_log_loss": loss, "best_step": None, "steps": None})
    return pd.DataFrame(rows)


def plot_history(run_dir: str | Path, name: str, root: Path | None = None) -> Any:
    """Held-out log loss and train loss against the step, one line per fold."""
    from matplotlib.figure import Figure

    root = Path(root) if root is not None else teacher_dir(run_dir, name)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for path in sorted(root.glob("fold*/metrics.json")):
        history = json.loads(path.read_text(encoding="utf-8"))["history"]
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["eval_log_loss"] for h in history], marker="o", label=f"{path.parent.name} held-out")
    ax.axhline(1.0986, color="grey", linestyle="--", label="uniform guess")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("log loss")
    ax.set_title(name)
    ax.legend()
    fig.tight_layout()
    return fig
