"""A recipe: the whole chain as committed JSON files, and ``lmsys plan``'s runbook for it.

A recipe folder holds ``recipe.json`` (``RecipeConfig``: the data sizes, and per stage its config file, the
hardware, the engine and process count) and one JSON config per stage — the very files ``lmsys teacher
--config``, ``lmsys distill --config``, ``lmsys quantize --config`` and ``lmsys predict --config`` take (and
the notebooks' ``config`` parameter). ``load`` reads every file and refuses an unknown key, naming the file
and the key.

``plan`` prints for each stage the command to run, the hardware, wall hours, GPU-hours, cost (from
``notebook.plan``: arithmetic on stated MFUs, a projection, not a measurement) and whether it fits the GPU's
memory. Parameter counts are exact: the model's ``config.json`` (shipped in ``lmsys_lib/architectures/`` for
the recipe's hub ids, architecture only, no weights; a local folder's own) is instantiated on the meta device,
and the LoRA count is Σ r·(in + out) over the targeted linear layers plus the score head.

Memory per GPU (training): frozen weights (nf4 ≈ 0.55 B per linear weight, 16-bit 2 B; other tensors 2 B; none
under full fine-tuning, whose weights are the fp32 masters) + trainable tensors × 16 B (fp32 master, gradient,
AdamW m and v) — both divided by the process count under FSDP (but the root unit — embeddings, norms, head —
whole), whole on every GPU under DDP; under full fine-tuning + 2 B a weight for autocast's 16-bit copies (whole);
under FSDP at least the load peak, a whole copy (frozen weights + fp32 masters) before it is sharded — + activations at the configured micro-batch × max_length (with gradient checkpointing
each layer's input, 2·b·s·h bytes, plus one layer's working set 34·b·s·h bytes, plus 5·heads·b·s² for eager
attention's scores; without it every layer's working set) + 1.5 GiB (CUDA context, workspace).
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import notebook
from .config import DistillConfig, InferenceConfig, QuantizeConfig, TeacherConfig, _check, from_dict

GIB = 1024 ** 3
STAGES = ("prepare", "teacher", "student", "merge", "quantize", "holdout", "inference")
ENGINES = ("single", "ddp", "fsdp", "replicas")  # replicas: one model per GPU, rows split (inference)
CONFIG_CLASS = {"teacher": TeacherConfig, "student": DistillConfig, "quantize": QuantizeConfig,
                "holdout": InferenceConfig, "inference": InferenceConfig}
ARCHITECTURES = Path(__file__).parent / "architectures"


@dataclasses.dataclass(frozen=True)
class RecipeStage:
    """One step of a recipe: what runs (``config``: its JSON file in the recipe folder), where, how."""

    stage: str = ""  # one of STAGES (required)
    config: str = ""
    hardware: str = "a100-80g"
    engine: str = "single"
    processes: int = 1
    accelerate_config: str = ""  # for `accelerate launch --config_file …` (multi-process training)
    note: str = ""

    def __post_init__(self) -> None:
        _check(self.stage in STAGES, f"stage must be one of {STAGES}")
        _check(self.engine in ENGINES, f"engine must be one of {ENGINES}")
        _check(self.processes >= 1, "processes must be >= 1")
        _check(self.hardware in notebook.HARDWARE, f"hardware must be one of {sorted(notebook.HARDWARE)}")


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The chain: data sizes (projection inputs until a prepared run folder gives the real counts) and stages."""

    name: str = "recipe"
    description: str = ""
    train_rows: int = 57_477  # the competition's train.csv
    share: float = 1.0  # lmsys prepare --share: the recipe runs on this share of the prompt groups
    holdout: float = 0.05
    folds: int = 5
    extra_data: tuple[str, ...] = ()  # files for lmsys prepare --extra (the runbook names them)
    extra_rows: int = 0  # rows of that extra data (assumed until prepared)
    test_rows: int = 25_000  # the hidden test set the kernel scores
    stages: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check(0.0 < self.share <= 1.0 and 0.0 <= self.holdout < 0.5, "share in (0, 1], holdout in [0, 0.5)")
        _check(self.folds >= 2 and self.train_rows >= 1, "folds >= 2, train_rows >= 1")


def load(folder: str | Path) -> tuple[RecipeConfig, list[tuple[RecipeStage, Any]]]:
    """Read ``recipe.json`` and every stage config; an unknown key is a ``ValueError`` naming file and key."""
    folder = Path(folder)
    recipe = _read(folder / "recipe.json", RecipeConfig)
    stages = []
    for i, raw in enumerate(recipe.stages):
        stage = _read(folder / "recipe.json", RecipeStage, raw, where=f"stages[{i}]")
        cfg = _read(folder / stage.config, CONFIG_CLASS[stage.stage]) if stage.config else None
        if stage.stage in CONFIG_CLASS and cfg is None:
            raise ValueError(f"{folder / 'recipe.json'}: stages[{i}] ({stage.stage}) needs a config file")
        _check_engine(folder / "recipe.json", i, stage, cfg)
        stages.append((stage, cfg))
    return recipe, stages


def _check_engine(path: Path, i: int, stage: RecipeStage, cfg: Any) -> None:
    """The stage's engine and its config agree: ``ddp`` / ``fsdp`` are for the training stages, several
    training processes need one of them and an accelerate config, FSDP is ``train.fsdp`` in the config (and in
    its post-pretraining, when there is one), on 2+ processes and not over nf4 — and ``train.fsdp`` is never
    set under another engine."""
    where = f"{path}: stages[{i}] ({stage.stage}{', ' + stage.config if stage.config else ''})"
    if stage.stage not in ("teacher", "student"):
        if stage.engine in ("ddp", "fsdp"):
            raise ValueError(f"{where}: engine {stage.engine!r} is for teacher / student training; "
                             "use 'single' or 'replicas' (one model per GPU, rows split)")
        return
    if stage.engine == "replicas" or (stage.engine == "single" and stage.processes > 1):
        raise ValueError(f"{where}: training on {stage.processes} process(es) with engine {stage.engine!r}: use "
                         "'single' (1 process), 'ddp' or 'fsdp'")
    if stage.engine in ("ddp", "fsdp") and stage.processes > 1 and not stage.accelerate_config:
        raise ValueError(f"{where}: engine {stage.engine!r} on {stage.processes} processes needs accelerate_config")
    if stage.engine == "fsdp" and stage.processes < 2:
        raise ValueError(f"{where}: engine 'fsdp' needs 2 or more processes (training refuses one)")
    if stage.engine == "fsdp" and cfg.model.quantization == "nf4":
        raise ValueError(f"{where}: engine 'fsdp' cannot shard nf4 weights; use engine 'ddp' for QLoRA")
    for key, train in (("train", cfg.train), ("pretrain.train", cfg.pretrain.train)):
        if stage.engine == "fsdp" and not train.fsdp and (key == "train" or cfg.pretrain.data):
            raise ValueError(f"{where}: engine 'fsdp' needs {key}.fsdp = true in {stage.config}")
        if stage.engine != "fsdp" and train.fsdp:
            raise ValueError(f"{where}: {stage.config} sets {key}.fsdp but the stage's engine is {stage.engine!r}")
    if stage.accelerate_config:
        _check_accelerate_config(path, where, stage)


def _check_accelerate_config(path: Path, where: str, stage: RecipeStage) -> None:
    """The stage's accelerate config exists (a relative name is looked up from the working directory, then
    from each folder above the recipe: the repository root) and launches as many processes as the stage says,
    multi-process ones as ``MULTI_GPU`` (DDP; FSDP2 is set up by the training code, not by accelerate)."""
    import yaml

    name = Path(stage.accelerate_config)
    places = [name] if name.is_absolute() else [Path.cwd() / name] + [d / name for d in Path(path).resolve().parents]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        raise ValueError(f"{where}: accelerate_config {stage.accelerate_config} not found (looked in the working "
                         "directory and in each folder above the recipe)")
    launch = yaml.safe_load(found.read_text(encoding="utf-8")) or {}
    processes = int(launch.get("num_processes", 1))
    if processes != stage.processes:
        raise ValueError(f"{where}: {found} launches num_processes {processes}, the stage says processes "
                         f"{stage.processes}")
    if processes > 1 and launch.get("distributed_type") != "MULTI_GPU":
        raise ValueError(f"{where}: {found} has distributed_type {launch.get('distributed_type')!r}; "
                         f"{processes} training processes need MULTI_GPU")


def _read(path: Path, cls: type, data: Any = None, where: str = "") -> Any:
    try:
        if data is None:
            data = json.loads(path.read_text(encoding="utf-8"))
        return from_dict(cls, data)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (named in the recipe)") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}{': ' + where if where else ''}: {err}") from None


# -- the model's size, on the meta device ---------------------------------------------------------


def architecture_file(model_dir: str) -> Path:
    """The ``config.json`` of a named model: a local folder's own, else the shipped one for its hub id."""
    local = Path(model_dir) / "config.json"
    if local.is_file():
        return local
    shipped = ARCHITECTURES / (model_dir.replace("/", "--") + ".json")
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no architecture for {model_dir!r}: not a local folder with config.json, and not "
                            f"one of the shipped {sorted(p.stem.replace('--', '/') for p in ARCHITECTURES.glob('*.json'))}")


@lru_cache(maxsize=16)
def model_counts(model_dir: str, lora_r: int, target_modules: tuple[str, ...]) -> dict[str, Any]:
    """Exact parameter counts of a model's architecture, instantiated on the meta device (no weights): the
    causal LM, the 3-label classifier, its linear weights in the decoder layers, and the trainable count
    (LoRA r·(in + out) per targeted linear, plus the score head; every weight when ``lora_r`` is 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    data = json.loads(architecture_file(model_dir).read_text(encoding="utf-8"))
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        causal = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        config.num_labels = 3
        model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("score"):
            linear += module.weight.numel()
            if name.split(".")[-1] in target_modules:
                lora += lora_r * (module.in_features + module.out_features)
    head = model.score.weight.numel()
    return {"causal_lm": causal, "classifier": total, "linear": linear, "lora": lora, "head": head,
            "trainable": total if lora_r == 0 else lora + head, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "heads": config.num_attention_heads,
            "softcap": bool(getattr(config, "attn_logit_softcapping", None))}


# -- memory ------------------------------------------------------------------------------------------


def attention_of(requested: str, softcap: bool, hardware: str) -> str:
    """The kernel ``modeling.attention_for`` picks on ``hardware``'s GPUs: a soft-capped family (Gemma-2) gets
    flash-attention-2 on sm >= 80 (assuming ``flash_attn`` is installed there; else eager, as on a T4), every
    other family SDPA."""
    if requested != "auto":
        return requested
    if not softcap:
        return "sdpa"
    return "eager" if notebook.HARDWARE[hardware].gpu == "T4" else "flash_attention_2"


def training_memory(counts: dict[str, Any], cfg: Any, stage: RecipeStage) -> dict[str, float]:
    """GiB per GPU for training under the stage's engine (see the module docstring for the formula)."""
    nf4 = cfg.model.quantization == "nf4"
    weights = counts["linear"] * (0.55 if nf4 else 2.0) + (counts["classifier"] - counts["linear"]) * 2.0
    if cfg.model.lora_r == 0:
        weights = 0.0  # full fine-tuning: every weight is a trainable fp32 master (below)
    trainable = counts["trainable"] * 16.0
    load_peak = 0.0
    # full fine-tuning under 16-bit autocast: a 16-bit copy of every master, kept for backward (never sharded)
    casts = counts["trainable"] * 2.0 if cfg.model.lora_r == 0 else 0.0
    if stage.engine == "fsdp":  # each process loads a whole copy, then keeps 1/processes of it
        load_peak = weights + counts["trainable"] * 4.0
        root = (counts["classifier"] - counts["linear"]) * (4.0 if cfg.model.lora_r == 0 else 2.0)
        # every unit, the root too, keeps 1/processes; the root's whole copy, gathered for the forward, stays
        # gathered through the step (FSDP2 does not reshard the root after its forward): its shard + the whole
        weights, trainable = weights / stage.processes + root, trainable / stage.processes
    b, s, h, layers = cfg.train.batch_size, cfg.pack.max_length, counts["hidden"], counts["layers"]
    eager = attention_of(cfg.model.attn_implementation, bool(counts["softcap"]), stage.hardware) == "eager"
    working = 34 * b * s * h + (5 * counts["heads"] * b * s * s if eager else 0)
    activations = (layers * 2 * b * s * h + working) if cfg.model.gradient_checkpointing else layers * working
    weights += casts
    total = max(weights + trainable + activations, load_peak) + notebook.OVERHEAD_GIB * GIB
    return {"weights": weights / GIB, "trainable": trainable / GIB, "activations": activations / GIB,
            "load_peak": load_peak / GIB, "total": total / GIB, "eager": eager}


# -- the runbook ---------------------------------------------------------------------------------------


def plan(folder: str | Path, run_dir: str | Path | None = None, price_per_hour: float | None = None) -> dict[str, Any]:
    """The runbook of the recipe in ``folder``: rows, then per stage its command, hardware, hours, GPU-hours,
    cost, memory and fit. ``run_dir``: a prepared run folder whose real row counts replace the recipe's."""
    recipe, stages = load(folder)
    rows = _rows(recipe, run_dir)
    out = [_stage_plan(folder, recipe, stages, stage, cfg, rows, price_per_hour) for stage, cfg in stages]
    return {"recipe": recipe.name, "description": recipe.description, "rows": rows, "folder": str(folder),
            "stages": out, "total_hours": sum(s["hours"] for s in out), "total_gpu_hours": sum(s["gpu_hours"] for s in out),
            "total_cost": sum(s["cost"] for s in out)}


def _rows(recipe: RecipeConfig, run_dir: str | Path | None) -> dict[str, Any]:
    if run_dir is not None:
        report = json.loads((Path(run_dir) / "data" / "prepare.json").read_text(encoding="utf-8"))
        return {"train": report["train_rows"], "holdout": report["holdout_rows"],
                "extra": report.get("extra_rows", 0), "test": recipe.test_rows, "source": f"{run_dir}/data/prepare.json"}
    kept = round(recipe.train_rows * recipe.share)
    holdout = round(kept * recipe.holdout)
    return {"train": kept - holdout, "holdout": holdout, "extra": round(recipe.extra_rows * recipe.share),
            "test": recipe.test_rows, "source": "recipe.json (projection: before de-duplication)"}


def _stage_plan(folder: str | Path, recipe: RecipeConfig, stages: list[tuple[RecipeStage, Any]], stage: RecipeStage,
                cfg: Any, rows: dict[str, Any], price: float | None) -> dict[str, Any]:
    entry = {"stage": stage.stage, "name": getattr(cfg, "name", stage.stage), "hardware": stage.hardware,
             "engine": stage.engine, "processes": stage.processes,
             "command": _command(folder, recipe, stage, _student(folder, stages).name),
             "hours": 0.0, "gpu_hours": 0.0, "cost": 0.0, "fits": True, "memory": "", "detail": [],
             "note": stage.note}
    if stage.stage in ("teacher", "student"):
        _training_plan(entry, cfg, stage, recipe, rows, price)
    elif stage.stage in ("quantize", "holdout", "inference", "merge"):
        _other_plan(entry, _student(folder, stages).model, _config_of(stages, "quantize"), recipe.folds, cfg, stage,
                    rows, price)
    return entry


def _training_plan(entry: dict[str, Any], cfg: Any, stage: RecipeStage, recipe: RecipeConfig,
                   rows: dict[str, Any], price: float | None) -> None:
    counts = model_counts(cfg.model.model_dir, cfg.model.lora_r, tuple(cfg.model.target_modules))
    n = counts["classifier"] / 1e9
    opts = {"lora": cfg.model.lora_r > 0, "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "weight_bits": 4 if cfg.model.quantization == "nf4" else 16, "price_per_hour": price}
    k = recipe.folds
    train_rows = round(rows["train"] * cfg.fraction)
    parts = [notebook.plan("teacher", n, train_rows, cfg.pack.max_length, stage.hardware, epochs=cfg.train.epochs,
                           folds=k, tta=False, **opts)]
    detail = [f"model {cfg.model.model_dir}: {counts['causal_lm'] / 1e9:.2f} B parameters as a causal LM, "
              f"{counts['classifier'] / 1e9:.2f} B as the classifier; trainable "
              + (f"LoRA r = {cfg.model.lora_r} {counts['lora'] / 1e6:.1f} M + score head {counts['head']:,}"
                 if cfg.model.lora_r else f"every weight ({counts['trainable'] / 1e9:.2f} B)"),
              f"{k} folds × {cfg.train.epochs:g} epochs on {train_rows:,} rows at ≤ {cfg.pack.max_length} tokens; "
              f"{parts[0].wall_hours:.1f} h"]
    evals = _evaluations(cfg, train_rows, k, stage.processes)
    if evals:
        checks = notebook.plan("inference", n, round(train_rows / k) * evals * k, cfg.pack.max_length,
                               stage.hardware, tta=False, weight_bits=opts["weight_bits"], price_per_hour=price)
        parts.append(checks)
        detail.append(f"held-out evaluations: {evals} per fold (eval_every {cfg.train.eval_every} steps, and the "
                      f"last) on ~{round(train_rows / k):,} rows: {checks.wall_hours:.1f} h")
    if entry["stage"] == "teacher":  # each fold model scores its own training rows (the student's targets)
        scoring = notebook.plan("inference", n, train_rows * (k - 1), cfg.pack.max_length, stage.hardware,
                                tta=False, weight_bits=opts["weight_bits"], price_per_hour=price)
        parts.append(scoring)
        detail.append(f"in-fold targets: the {k} fold models score their {train_rows * (k - 1):,} training rows: "
                      f"{scoring.wall_hours:.1f} h")
    if cfg.pretrain.data:
        pre_rows = round(rows["extra"] * (1 - cfg.pretrain.held_out_share))
        pre = notebook.plan("teacher", n, max(1, pre_rows), cfg.pack.max_length, stage.hardware,
                            epochs=cfg.pretrain.train.epochs, folds=1, tta=False, **opts)
        parts.append(pre)
        detail.append(f"post-pretraining on {pre_rows:,} extra rows ({', '.join(cfg.pretrain.data)}), "
                      f"{cfg.pretrain.train.epochs:g} epoch at lr {cfg.pretrain.train.lr:g}: {pre.wall_hours:.1f} h")
    _add_time(entry, parts, stage)
    memory = training_memory(counts, cfg, stage)
    gpu = notebook.HARDWARE[stage.hardware]
    entry["fits"] = memory["total"] <= gpu.memory_gib
    entry["memory"] = (f"{memory['total']:.1f} GiB of {gpu.memory_gib:g} per GPU ({stage.engine}: weights "
                       f"{memory['weights']:.1f} + trainable×16 B {memory['trainable']:.1f} + activations "
                       f"{memory['activations']:.1f} at {cfg.train.batch_size}×{cfg.pack.max_length} tokens"
                       + (", eager attention" if memory["eager"] else "")
                       + (", flash-attention-2 (without flash_attn installed: eager, "
                          f"{training_memory(counts, _with_attention(cfg, 'eager'), stage)['total']:.1f} GiB)"
                          if attention_of(cfg.model.attn_implementation, bool(counts["softcap"]), stage.hardware)
                          == "flash_attention_2" else "")
                       + (", checkpointed" if cfg.model.gradient_checkpointing else "") + " + 1.5"
                       + (f"; at least the load peak, a whole copy: {memory['load_peak']:.1f}" if memory["load_peak"]
                          else "") + ")")
    micro = cfg.train.global_batch or cfg.train.batch_size * cfg.train.grad_accum * stage.processes
    detail.append(f"global batch {micro} rows = {stage.processes} process(es) × {cfg.train.batch_size} rows × "
                  f"{micro // (cfg.train.batch_size * stage.processes)} micro-batches; lr {cfg.train.lr:g}")
    entry["detail"] = detail


def _with_attention(cfg: Any, attn: str) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation=attn))


def _evaluations(cfg: Any, train_rows: int, k: int, processes: int) -> int:
    """Held-out evaluations per fold: one every ``eval_every`` optimiser steps, and one after the last."""
    import math

    per_step = cfg.train.global_batch or cfg.train.batch_size * cfg.train.grad_accum * processes
    steps = math.ceil(cfg.train.epochs * train_rows * (k - 1) / k / per_step)
    steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    return (steps // cfg.train.eval_every if cfg.train.eval_every else 0) + 1


def _other_plan(entry: dict[str, Any], model: Any, quantize: Any, folds: int, cfg: Any, stage: RecipeStage,
                rows: dict[str, Any], price: float | None) -> None:
    """merge, quantize, holdout, inference: sized by the student's model (and the quantisation's bits)."""
    counts = model_counts(model.model_dir, model.lora_r, tuple(model.target_modules))
    n = counts["classifier"] / 1e9
    bits = quantize.bits if quantize is not None else 16
    if entry["stage"] == "merge":
        p = notebook.plan("merge", n, 1, 16, stage.hardware, folds=folds, price_per_hour=price)
    elif entry["stage"] == "quantize":
        p = notebook.plan("quantize", n, cfg.calib_rows, cfg.calib_max_length, stage.hardware, price_per_hour=price)
    else:
        count = rows["holdout"] if entry["stage"] == "holdout" else rows["test"]
        p = notebook.plan("inference", n, count, cfg.pack.max_length, stage.hardware, tta=cfg.tta,
                          weight_bits=bits, price_per_hour=price)
        entry["detail"].append(f"{count:,} rows at ≤ {cfg.pack.max_length} tokens, "
                               f"{'swap-TTA' if cfg.tta else 'one orientation'}, {bits}-bit weights; kernel budget "
                               f"{cfg.time_budget_s / 3600:.2f} h" + (" — the projection is over it"
                                                                     if p.wall_hours * 3600 > cfg.time_budget_s
                                                                     and entry["stage"] == "inference" else ""))
    _add_time(entry, [p], stage)
    entry["fits"] = p.fits_memory
    entry["memory"] = p.memory_note


def _add_time(entry: dict[str, Any], parts: list[Any], stage: RecipeStage) -> None:
    entry["hours"] = sum(p.wall_hours for p in parts)
    entry["gpu_hours"] = sum(p.gpu_hours for p in parts)
    entry["cost"] = sum(p.cost_usd for p in parts)


def _config_of(stages: list[tuple[RecipeStage, Any]], kind: str) -> Any:
    """The config of the recipe's last ``kind`` stage, or None."""
    return next((cfg for stage, cfg in reversed(stages) if stage.stage == kind), None)


def _student(folder: str | Path, stages: list[tuple[RecipeStage, Any]]) -> Any:
    student = _config_of(stages, "student")
    if student is None:
        raise ValueError(f"{folder}: a recipe needs a student stage (merge, quantize and inference are sized by it)")
    return student


def _command(folder: str | Path, recipe: RecipeConfig, stage: RecipeStage, student: str) -> str:
    config = f"{folder}/{stage.config}" if stage.config else ""
    launch = (f"accelerate launch --config_file {stage.accelerate_config} -m lmsys_lib"
              if stage.processes > 1 and stage.stage in ("teacher", "student") else "lmsys")
    extra = "".join(f" {p}" for p in recipe.extra_data)
    return {
        "prepare": f"lmsys prepare --train train.csv --run-dir RUN --folds {recipe.folds} --holdout {recipe.holdout:g}"
                   + (f" --share {recipe.share:g}" if recipe.share < 1 else "") + (f" --extra{extra}" if extra else ""),
        "teacher": f"{launch} teacher --run-dir RUN --config {config}",
        "student": f"{launch} distill --run-dir RUN --config {config}",
        "merge": f"lmsys merge --run-dir RUN --name {student}",
        "quantize": f"lmsys quantize --run-dir RUN --config {config}",
        "holdout": f"lmsys predict --run-dir RUN --config {config} --priors-from RUN/data/train.csv && lmsys evaluate "
                   "--run-dir RUN --pred RUN/predict/holdout_submission.csv",
        "inference": "lmsys kaggle build --run-dir RUN && lmsys kaggle push (notebook 05 runs with "
                     f"--config {config}; see README, Kaggle)",
    }[stage.stage]


def render(result: dict[str, Any]) -> str:
    """The runbook as text: one block per stage, then the totals."""
    lines = [f"recipe {result['recipe']} ({result['folder']}): {result['description']}",
             f"rows: {result['rows']['train']:,} train, {result['rows']['holdout']:,} holdout, "
             f"{result['rows']['extra']:,} extra, {result['rows']['test']:,} test — from {result['rows']['source']}",
             "hours, GPU-hours and cost are projections (notebook.plan: stated MFUs and prices; see its "
             "assumptions), memory an estimate (lmsys_lib.recipe)", ""]
    for i, s in enumerate(result["stages"], 1):
        lines.append(f"{i}. {s['stage']} {s['name']} — {s['hardware']}, {s['engine']}"
                     + (f" × {s['processes']}" if s["processes"] > 1 else ""))
        lines.append(f"   $ {s['command']}")
        if s["stage"] != "prepare":
            lines.append(f"   wall {notebook.format_duration(s['hours'] * 3600)}, {s['gpu_hours']:.1f} GPU-hours, "
                         f"${s['cost']:,.0f}")
            lines.append(f"   memory: {'fits' if s['fits'] else 'DOES NOT FIT'} — {s['memory']}")
        lines += [f"   {d}" for d in s["detail"]] + ([f"   note: {s['note']}"] if s["note"] else [])
    lines.append(f"total: {result['total_hours']:.1f} h wall, {result['total_gpu_hours']:.1f} GPU-hours, "
                 f"${result['total_cost']:,.0f}")
    return "\n".join(lines)
