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
from .config import ModelConfig, PackConfig, PretrainConfig, TrainConfig, to_dict

OOF_COLUMNS = ("id", "fold", "logit_a", "logit_b", "logit_tie", "teacher")
GIVEN_MODEL = "model_dir_given"  # in a saved stage config: the model as named at launch (merge's default base)


def run(run_dir: str | Path, cfg: Any, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Run a ``TeacherConfig`` in ``run_dir``; returns ``oof.parquet`` (or the teacher folder for a partial
    run). The config is saved beside the output; another config for the same teacher name is refused (unless
    ``force``: the folds it runs are trained again from scratch).

    Each fold model also scores its own training rows (``fold<k>/train_logits.parquet``: the student's
    fold-aligned targets). With ``cfg.pretrain.data`` the teacher is first post-pretrained on that extra data
    and its folds start from the merged checkpoint (``teachers/<name>/pretrained/merged``); a finished
    post-pretraining is reused. When every fold is there, ``oof.parquet`` and ``temperature.json`` (fitted on
    the OOF logits) are written.
    """
    root = teacher_dir(run_dir, cfg.name)

    def body(model_cfg: ModelConfig, accelerator: Any, quiet: Callable[[str], None]) -> Path:
        model_cfg = pretrained_base(run_dir, root, cfg, model_cfg, quiet, accelerator)
        stage = stage_identity(cfg)
        return train_folds(run_dir, cfg.name, model_cfg, cfg.train, cfg.pack, folds=cfg.folds or None,
                           fraction=cfg.fraction, log=quiet, accelerator=accelerator, score_train=True,
                           fold_identity=lambda fold: {"stage": stage})

    return run_fold_stage(run_dir, cfg, root / "teacher_config.json", f"teacher-{cfg.name}", body, log, force)


def pretrained_base(run_dir: str | Path, root: Path, cfg: Any, model_cfg: ModelConfig, log: Callable[[str], None],
                    accelerator: Any) -> ModelConfig:
    """``model_cfg`` itself, or — with ``cfg.pretrain.data`` — pointing at the post-pretrained checkpoint."""
    if not cfg.pretrain.data:
        return model_cfg
    pre = post_pretrain(run_dir, root, cfg.pretrain, model_cfg, cfg.pack, log=log, accelerator=accelerator)
    return dataclasses.replace(model_cfg, model_dir=str(pre.model_dir))


def stage_identity(cfg: Any) -> dict[str, Any]:
    """What a k-fold stage's results depend on: its config less ``folds`` (which folds run now may vary between
    sessions and machines), the model named portably (``zoo.model_identity``: a hub id or zoo name as written,
    a local folder by its name and content — not by the path it is mounted at)."""
    from .config import to_dict
    from .zoo import model_identity

    identity = {k: v for k, v in to_dict(cfg).items() if k != "folds"}
    identity["model"]["model_dir"] = model_identity(cfg.model.model_dir)
    return identity


def split_identity(ids: Sequence[Any], fold_of: np.ndarray) -> str:
    """sha256 of the run's (id, fold) pairs (``load_split``): models trained on another split of the data never
    mix with these."""
    import hashlib

    pairs = sorted(f"{i}:{f}" for i, f in zip(map(str, ids), fold_of.tolist()))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def stage_progress(root: Path) -> list[Path]:
    """The folders under a model's ``root`` holding trained progress (checkpoints, adapters, metrics)."""
    from .train import has_progress

    return [d for d in sorted(root.glob("fold*")) + [root / "pretrained"] if d.is_dir() and has_progress(d)]


def clear_stage(root: Path, folds: Sequence[int] | None, log: Callable[[str], None]) -> None:
    """``--force``: remove what a re-run replaces — the given folds (all, and post-pretraining, when None) and
    everything gathered from the folds (OOF logits, temperature)."""
    import shutil

    targets = [root / f"fold{f}" for f in folds] if folds else [*root.glob("fold*"), root / "pretrained"]
    targets += [root / name for name in ("oof.parquet", "temperature.json")]
    for path in targets:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log(f"[{root.name}] forced: {', '.join(p.name for p in targets)} cleared before training")


def run_fold_stage(run_dir: str | Path, cfg: Any, saved: Path, stage: str,
                   body: Callable[[ModelConfig, Any, Callable[[str], None]], Path],
                   log: Callable[[str], None] = print, force: bool = False) -> Path:
    """The frame shared by the k-fold stages (teacher, student) under one ``accelerate`` process group.

    Saves ``stage_identity(cfg)`` at ``saved`` and refuses another config there — unless nothing was trained
    under it yet (a launch that failed before its first checkpoint locks nothing), or ``force`` (the folds
    being run are cleared first); resolves a ``zoo:`` or hub model once (main process first); runs
    ``body(model_cfg, accelerator, log)``; when it returns an ``oof.parquet``, fits the temperature on it
    (``temperature.json``) and records the stage as done.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from .config import save_stage
    from .train import refuse_fsdp
    from .zoo import resolve_model_dir

    refuse_fsdp()  # before the process group forms (accelerate's FSDP plugin needs a GPU to even start)
    # rank 0 alone fetches a hub model and merges a post-pretrained base (a 70B: far over the default timeout)
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))])
    main = accelerator.is_main_process
    try:
        identity = stage_identity(cfg) | {"split": split_identity(*_ids_folds(run_dir))}
        changed = _claim(saved, identity, cfg, force, log if main else (lambda _: None))
        if main:
            if force:  # a changed config invalidates every fold and the post-pretraining, not just those run now
                clear_stage(saved.parent, None if changed else (cfg.folds or None), log)
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_name(saved.name + ".tmp")
            given = {GIVEN_MODEL: cfg.model.model_dir}  # where it was read from here: a hint, not compared
            tmp.write_text(json.dumps(identity | given, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(tmp, saved)  # atomic: another process never reads half a file
            resolve_model_dir(cfg.model.model_dir)  # a zoo/hub model is fetched once, by one process
        accelerator.wait_for_everyone()
        model_cfg = dataclasses.replace(cfg.model, model_dir=resolve_model_dir(cfg.model.model_dir))
        out = body(model_cfg, accelerator, log if main else (lambda _: None))
        if main and out.name == "oof.parquet":
            save_oof_temperature(run_dir, out.parent, log)
            save_stage(run_dir, stage, cfg)
        accelerator.wait_for_everyone()
        return out
    finally:
        # Tear the process group down before interpreter exit: a gloo group left to the garbage
        # collector can abort a rank ("terminate called without an active exception").
        accelerator.end_training()


def _ids_folds(run_dir: str | Path) -> tuple[list[Any], np.ndarray]:
    frame, fold_of = load_split(run_dir)
    return frame["id"].tolist(), fold_of


def _claim(saved: Path, identity: dict[str, Any], cfg: Any, force: bool, log: Callable[[str], None]) -> bool:
    """Whether the saved config differs from ``identity``; raises when it does and something was trained under
    it (unless ``force``)."""
    if not saved.exists():
        return False
    before = json.loads(saved.read_text(encoding="utf-8"))
    before.pop(GIVEN_MODEL, None)
    if before == identity:
        return False
    if force:
        return True
    progress = stage_progress(saved.parent)
    if progress:
        raise ValueError(f"{saved} holds another config for '{cfg.name}', and {', '.join(p.name for p in progress)} "
                         "trained under it: use another name or run folder, or --force to train again")
    log(f"[{cfg.name}] {saved.name} held another config, but nothing was trained under it: replaced")
    return True


def save_oof_temperature(run_dir: str | Path, root: Path, log: Callable[[str], None] = print) -> float:
    """Fit T on ``root/oof.parquet`` against the run's labels → ``root/temperature.json`` (carried by the merge
    into the model's contract, used by ``lmsys predict``)."""
    from .evaluate import fit_temperature, save_temperature, temperature_report

    frame, _ = load_split(run_dir)
    oof = pd.read_parquet(root / "oof.parquet").set_index("id").loc[frame["id"]]
    logits, labels = oof[["logit_a", "logit_b", "logit_tie"]].to_numpy(np.float64), frame["label"].to_numpy()
    t = fit_temperature(logits, labels)
    report = temperature_report(logits, labels, t, source=str(Path(root.name) / "oof.parquet"))
    save_temperature(root, t, report, overwrite=True)
    log(f"[{root.name}] temperature T = {t:.3f} fitted on the OOF logits: log loss {report['log_loss_before']:.4f}"
        f" → {report['log_loss_after']:.4f} ({root / 'temperature.json'})")
    return t


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


def dry_run_rows(ids: Sequence[Any], fraction: float) -> np.ndarray:
    """The rows of a dry run: an id is in when a hash of it falls below ``fraction`` — the same rows in every
    stage and run that uses the same fraction (the student's fold k meets the rows teacher fold k scored)."""
    import hashlib

    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    u = [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") / 2**64 for i in ids]
    return np.asarray(u) < fraction


def train_folds(run_dir: str | Path, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig,
                pack_cfg: PackConfig, folds: Sequence[int] | None = None, fraction: float = 1.0,
                log: Callable[[str], None] = print, accelerator: Any = None, root: Path | None = None,
                loss_for: Callable[[int, train.TrainData], Any] | None = None, score_train: bool = False,
                fold_identity: Callable[[int], dict[str, Any]] | None = None) -> Path:
    """Train the given folds (default: all) of model ``name``; write ``oof.parquet`` once all exist.

    ``fraction`` < 1 trains and evaluates on that share of each fold (a dry run, ``dry_run_rows``); the OOF
    file is only written for a full run, since a partial one cannot cover every id. ``root`` is the model's
    folder (default ``teachers/<name>``); ``loss_for(fold, fold_train_data)`` gives a fold's training loss
    (default: cross-entropy) — the student stage passes its distillation loss here, so both share one loop.
    ``score_train``: each fold model also scores its own training rows (``fold<k>/train_logits.parquet``).
    ``fold_identity(fold)``: more of what fold ``fold`` depends on (the stage config, the student's targets),
    recorded with it; a finished fold recorded with other values is refused, not reused.
    """
    from .modeling import load_tokenizer
    from .prompting import Packer

    root = Path(root) if root is not None else teacher_dir(run_dir, name)
    frame, fold_of = load_split(run_dir)
    k = int(fold_of.max()) + 1
    split = split_identity(frame["id"].tolist(), fold_of)
    keep = dry_run_rows(frame["id"].tolist(), fraction)
    frame, fold_of = frame.loc[keep].reset_index(drop=True), fold_of[keep]
    data = train.pack_for_training(Packer(load_tokenizer(model_cfg.model_dir), pack_cfg), frame)
    extra = {"pack": to_dict(pack_cfg), "split": split, "fraction": fraction}
    for fold in (range(k) if folds is None else folds):
        if not 0 <= fold < k:
            raise ValueError(f"fold {fold} does not exist: the run has folds 0–{k - 1} (data/folds.parquet)")
        out = root / f"fold{fold}"
        mine = extra | (fold_identity(fold) if fold_identity else {})
        if fold_done(out, score_train):
            _same_fit(out, model_cfg, train_cfg, mine, accelerator)
            log(f"[{name}] fold {fold} already trained — skipped")
            continue
        log(f"[{name}] fold {fold}: {int((fold_of != fold).sum())} train rows, {int((fold_of == fold).sum())} held out")
        fold_train = data.subset(fold_of != fold)
        train.fit(model_cfg, train_cfg, fold_train, data.subset(fold_of == fold), out, log=log,
                  accelerator=accelerator, loss_fn=loss_for(fold, fold_train) if loss_for else None,
                  score_train=score_train, extra_identity=mine)
    finished = all(fold_done(root / f"fold{f}", score_train) for f in range(k))  # eval_logits exist mid-fold
    if fraction >= 1.0 and finished:
        if accelerator is None or accelerator.is_main_process:
            write_oof(root, name, frame["id"].to_numpy(), k)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return root / "oof.parquet"
    return root


def _same_fit(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, extra: dict[str, Any], accelerator: Any) -> None:
    """A finished fold (perhaps trained on another machine and copied in) must have been trained with these
    settings, on this split: else its logits would be mixed with other models'."""
    processes = accelerator.num_processes if accelerator is not None else 1
    want = train.fit_identity(model_cfg, train_cfg, processes) | extra
    path = out / "fit_config.json"
    have = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if have != want:
        diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
        raise ValueError(f"{out} was trained with other settings or on another split ({path}: {diff} differ): "
                         "remove it, or train it again with --force")


def fold_done(out: Path, score_train: bool = False) -> bool:
    """A fold is finished when its metrics and held-out logits exist (and its training-row logits, if asked)."""
    need = ["metrics.json", "eval_logits.parquet"] + (["train_logits.parquet"] if score_train else [])
    return all((out / name).exists() for name in need)


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


def data_path(run_dir: str | Path, path: str) -> Path:
    """A data file named in a config: a relative path is looked up inside the run folder first (``data/extra.csv``,
    written by ``lmsys prepare --extra``, so a config and its run folder move together), then from the working
    directory."""
    inside = Path(run_dir) / path
    return inside if not Path(path).is_absolute() and inside.exists() else Path(path)


def post_pretrain(run_dir: str | Path, root: Path, cfg: PretrainConfig, model_cfg: ModelConfig,
                  pack_cfg: PackConfig, log: Callable[[str], None] = print, accelerator: Any = None) -> PretrainResult:
    """Train on extra preference data (e.g. UltraFeedback-derived) and merge into a new base checkpoint.

    The extra files (``data_path``) are read with ``parsing.read_extra``; conversations that are also in the
    run's train or holdout rows are dropped (they would leak labels into the folds that hold them out, or into
    the holdout). The adapter is trained like a fold (resumable), then merged in fp32 into
    ``<root>/pretrained/merged`` (``root``: the teacher's or student's folder) — pass that folder as
    ``model_dir`` to ``train_folds``. A finished merge is reused.
    """
    from .modeling import load_tokenizer
    from .prompting import Packer

    name = root.name
    out = root / "pretrained"
    merged = out / ("adapter" if model_cfg.lora_r == 0 else "merged")  # full fine-tuning saves a checkpoint
    if (merged / "config.json").exists() and (out / "metrics.json").exists():
        log(f"[{name}] post-pretraining already done — starting the folds from {merged}")
        return PretrainResult(merged, json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    if (out / "metrics.json").exists() and (out / "adapter").exists():  # trained; only the merge was missing
        if accelerator is None or accelerator.is_main_process:
            merge_adapter_into_base(model_cfg, out / "adapter", merged, load_tokenizer(model_cfg.model_dir), log=log)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return PretrainResult(merged, json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    extra = pd.concat([parsing.read_extra(data_path(run_dir, path), seed=cfg.seed).frame for path in cfg.data],
                      ignore_index=True)
    seen = [Path(run_dir) / "data" / n for n in ("train.csv", "holdout.csv") if (Path(run_dir) / "data" / n).exists()]
    train_rows = pd.concat([parsing.read_competition(p).frame for p in seen], ignore_index=True)
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
    # stored as the base: the folds load it in their 16-bit (or 4-bit) dtype, so more bits would be rounded away
    return merge_exact(model_cfg.model_dir, [adapter_dir], out_dir, tokenizer=tokenizer, log=log, storage="base")


def prepare_run(run_dir: str | Path, data_dir: str | Path, k: int = 5, seed: int = 42) -> Path:
    """Make a run folder from competition data: ``data/train.csv`` (a copy) and grouped ``folds.parquet``.

    Re-running with the same data and (k, seed) is a no-op; other folds in the same folder are refused.
    """
    import shutil

    from .config import FoldConfig, claim_stage, save_stage

    run_dir, cfg = Path(run_dir), FoldConfig(k=k, seed=seed)
    if (run_dir / "config" / "prepare.json").exists():  # `lmsys prepare` made the data, folds and holdout
        print(f"{run_dir}: data prepared by `lmsys prepare` (data/prepare.json) — used as is")
        return run_dir
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


# -- logits made elsewhere ---------------------------------------------------------------------------

IMPORT_COLUMNS = ("id", "fold", "logit_a", "logit_b", "logit_tie", "split")  # + "teacher" unless --name
SPLITS = ("held_out", "train")


def import_logits(run_dir: str | Path, path: str | Path, name: str | None = None, force: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bring a teacher's logits made elsewhere (another node, another tool) into the run folder.

    The parquet file has one row per (fold model, row it scored): ``id``, ``fold`` (the fold model), the three
    logits, ``teacher`` (its name; or pass ``name``), ``split``: ``held_out`` — fold model ``fold`` did not train
    on the row (its OOF logit; ``fold`` must be the row's fold in the run) — or ``train`` — it did (the
    student's in-fold targets: for each fold k present, exactly the run's rows outside fold k). Everything is
    checked against ``data/folds.parquet`` (ids complete, unique, finite, folds matching) before anything is
    written; then ``teachers/<name>/oof.parquet`` (+ ``temperature.json``) and ``fold<k>/train_logits.parquet``
    are written as the teacher stage writes them. Returns a summary.
    """
    table = pd.read_parquet(path)
    name = _import_name(table, name, path)
    table = table.assign(teacher=name)
    frame, fold_of = load_split(run_dir)
    checked = _check_import(table, frame["id"].to_numpy(), fold_of, source=str(path))
    root = teacher_dir(run_dir, name)
    if root.exists() and any(root.iterdir()) and not force:
        raise ValueError(f"{root} exists: a teacher named '{name}' is in the run already (--force to replace it)")
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    for fold, part in checked["train"].items():
        (root / f"fold{fold}").mkdir()
        part[["id", "logit_a", "logit_b", "logit_tie"]].to_parquet(root / f"fold{fold}" / "train_logits.parquet")
    if checked["held_out"] is not None:
        checked["held_out"][list(OOF_COLUMNS)].to_parquet(root / "oof.parquet")
        save_oof_temperature(run_dir, root, log)
    summary = {"teacher": name, "oof_rows": 0 if checked["held_out"] is None else len(checked["held_out"]),
               "in_fold_folds": sorted(checked["train"]), "source": str(path)}
    (root / "imported.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log(f"teacher '{name}' imported into {root}: OOF logits for {summary['oof_rows']} rows"
        + (f", in-fold logits of folds {summary['in_fold_folds']}" if checked["train"] else ", no in-fold logits "
           "(distil with targets = \"oof\")"))
    return summary


def _import_name(table: pd.DataFrame, name: str | None, path: str | Path) -> str:
    missing = [c for c in IMPORT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (schema: {list(IMPORT_COLUMNS)} + teacher)")
    if name:
        return name
    names = sorted(set(table["teacher"].astype(str))) if "teacher" in table.columns else []
    if len(names) != 1:
        raise ValueError(f"{path}: the teacher column names {names or 'nobody'}: pass --name (one teacher per file)")
    return names[0]


def _check_import(table: pd.DataFrame, ids: np.ndarray, fold_of: np.ndarray, source: str) -> dict[str, Any]:
    """The file's held-out part as an OOF table and its train part per fold, each validated."""
    bad_split = sorted(set(table["split"].astype(str)) - set(SPLITS))
    if bad_split:
        raise ValueError(f"{source}: split must be one of {list(SPLITS)}, got {bad_split}")
    run_fold = pd.Series(fold_of, index=ids)
    unknown = sorted(set(table["id"].tolist()) - set(ids.tolist()))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} ids not in the run's train rows, e.g. {unknown[:10]}")
    k = int(fold_of.max()) + 1
    wrong_fold = sorted(set(table["fold"].astype(int)) - set(range(k)))
    if wrong_fold:
        raise ValueError(f"{source}: folds {wrong_fold} do not exist: the run has folds 0–{k - 1}")
    held = table[table["split"] == "held_out"]
    oof = None
    if len(held):
        check_oof(held, ids, source=f"{source} (held_out)")
        off = held.loc[held["fold"].to_numpy() != run_fold.loc[held["id"]].to_numpy(), "id"].tolist()
        if off:
            raise ValueError(f"{source} (held_out): {len(off)} rows scored by another fold than the run gives them "
                             f"(ids {off[:10]}): the logits were made on other folds — import its folds.parquet "
                             "with lmsys prepare, or retrain")
        oof = held.reset_index(drop=True)
    trained = {}
    for fold, part in table[table["split"] == "train"].groupby("fold"):
        fold = int(fold)
        own = part.loc[run_fold.loc[part["id"]].to_numpy() == fold, "id"].tolist()
        if own:
            raise ValueError(f"{source} (train, fold {fold}): {len(own)} rows of fold {fold} itself (ids {own[:10]}): "
                             f"fold model {fold} must not train on its held-out fold — the logits come from other folds")
        check_oof(part, ids[fold_of != fold], source=f"{source} (train, fold {fold})")
        trained[fold] = part.reset_index(drop=True)
    if oof is None and not trained:
        raise ValueError(f"{source}: no rows")
    return {"held_out": oof, "train": trained}
