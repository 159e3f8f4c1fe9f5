"""``lmsys demo``: the six notebooks, executed headless in order on the embedded default, into one run folder.

    data                  synthetic train/test/sample_submission (competition dialect) + holdout.csv → data/,
                          validated (the only step run in-process: it stands in for the competition's files)
    00_eda                tables + plots → eda.md, plots/*.png, tokenizer/ (a BPE trained on the train text)
    01_teacher_training   a real small pretrained model (SmolLM2-135M, LoRA) per grouped fold → teachers/<name>/
                          (fold adapters, held-out logits, oof.parquet); resumes from its checkpoints when killed
    02_distillation       the same model with a new LoRA (SmolLM2-135M) distilled per fold from teacher fold k's
                          logits on its own training rows (in-fold targets) → student/<name>/
    03_lora_merge         the student's folds merged exactly → merged/, fidelity vs the fold ensemble on the holdout
    04_quantization       GPTQ 8-bit of the merged student → quantized/, fidelity vs the merged model
    05_inference_2xT4     the quantised student scores test.csv (swap-TTA, the temperature fitted on the student's
                          OOF logits, deadline guard, checkpoints in predict/) → submission.csv, validated
    report                report.md: each model's evaluation (01–04 write evaluation.md + plots beside the model)

Each notebook is run with papermill on a real kernel (the executed copy, outputs and plots included, lands in
``notebooks/``); each stage's config is passed as a JSON file (``config/inputs/``) through the notebook's
``config`` parameter, so the notebooks run exactly what the CLI would. Each stage is guarded by
``config.claim_stage``: re-running a finished stage is a no-op, another config in the same folder is refused
unless forced, a stage whose outputs went missing runs again. ``fraction`` < 1 is a dry run: every notebook
works on that share of its rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config as C
from . import evaluate, parsing, synthetic


@dataclass(frozen=True)
class Stage:
    """One notebook of the chain: its parameters, the stage config it runs, the outputs that prove it ran."""

    notebook: str
    params: dict[str, Any]
    config: Any
    outputs: tuple[Path, ...]

    @property
    def name(self) -> str:
        return Path(self.notebook).stem


def notebooks_dir(explicit: str | Path | None = None) -> Path:
    """The numbered notebooks: ``explicit``, ``$LMSYS_NOTEBOOKS``, or the source checkout's ``notebooks/``."""
    path = Path(explicit or os.environ.get("LMSYS_NOTEBOOKS") or Path(__file__).resolve().parents[1] / "notebooks")
    if not (path / "00_eda.ipynb").is_file():
        raise FileNotFoundError(f"no notebooks in {path}: pass --notebooks DIR (the checkout's notebooks/) "
                                "or set LMSYS_NOTEBOOKS")
    return path


def stages(run_dir: Path, cfg: C.DemoConfig) -> list[Stage]:
    """The chain's notebooks with the parameters that point each at the run folder and its stage config."""
    d, f = run_dir / "data", cfg.fraction
    student = cfg.student
    inference = dataclasses.replace(cfg.inference, pack=dataclasses.replace(
        student.pack, max_length=cfg.inference.pack.max_length))  # the student's prompt format
    return [
        Stage("00_eda.ipynb", {"data_dir": d, "out_dir": run_dir, "fraction": f}, None,
              (run_dir / "eda.md", run_dir / "tokenizer" / "tokenizer.json")),
        Stage("01_teacher_training.ipynb", {"run_dir": run_dir, "data_dir": d, "k_folds": cfg.folds.k,
                                            "fold_seed": cfg.folds.seed, "fraction": f}, cfg.teacher,
              (run_dir / "teachers" / cfg.teacher.name / "oof.parquet",)),
        Stage("02_distillation.ipynb", {"run_dir": run_dir, "baseline": False, "fraction": f}, student,
              (run_dir / "student" / student.name / "oof.parquet",)),
        Stage("03_lora_merge.ipynb", {"run_dir": run_dir, "base_dir": student.model.model_dir, "name": student.name,
                                      "max_length": student.pack.max_length, "fraction": f}, None,
              (run_dir / "merged" / "config.json", run_dir / "merged" / "fidelity.json")),
        Stage("04_quantization.ipynb", {"run_dir": run_dir, "max_length": student.pack.max_length,
                                        "fraction": f}, cfg.quantize,
              (run_dir / "quantized" / "config.json", run_dir / "quantized" / "fidelity.json")),
        Stage("05_inference_2xT4.ipynb", {"model_dir": run_dir / "quantized", "data_dir": d,
                                          "out_path": run_dir / "submission.csv", "work_dir": run_dir / "predict",
                                          "devices": "auto", "fraction": f}, inference,
              (run_dir / "submission.csv",)),
    ]


def run(run_dir: str | Path, cfg: C.DemoConfig | None = None, force: bool = False, notebooks: str | Path | None = None,
        log: Callable[[str], None] = print) -> Path:
    """Write the embedded default data, then execute the six notebooks in order into ``run_dir``."""
    cfg = cfg or C.DemoConfig()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    source = notebooks_dir(notebooks)
    d = run_dir / "data"
    data_cfg = {"synth": C.to_dict(cfg.synth), "holdout": cfg.holdout_rows}
    start = time.perf_counter()
    times = {"data": _guarded(run_dir, "data", data_cfg, [d / n for n in ("train.csv", "test.csv",
                                                                          "sample_submission.csv", "holdout.csv")],
                              lambda: stage_data(run_dir, cfg.synth, cfg.holdout_rows), force, log)}
    for stage in stages(run_dir, cfg):
        saved = {"params": _portable(stage.params, run_dir), "config": C.to_dict(stage.config) if stage.config else None,
                 "data": data_cfg}
        times[stage.name] = _guarded(run_dir, stage.name, saved, list(stage.outputs),
                                     lambda stage=stage: _execute(source, stage, run_dir, log), force, log)
    log(f"[report] {evaluate.run_report(run_dir, title='arena-distill demo')}: where the log loss goes, model by model")
    log(stage_times(times, time.perf_counter() - start))
    return run_dir


def stage_times(times: dict[str, float | None], total: float) -> str:
    """The wall time of each stage (None: skipped, already done) and of the whole run, as printed at the end."""
    lines = [f"  {name:22s} {'skipped (done)' if t is None else f'{t:7.1f} s'}" for name, t in times.items()]
    return "\n".join(["stage times:", *lines, f"  {'total':22s} {total:7.1f} s ({total / 60:.1f} min)"])


def _guarded(run_dir: Path, name: str, stage_cfg: Any, outputs: list[Path], fn: Callable[[], str], force: bool,
             log: Callable[[str], None]) -> float | None:
    """Run ``fn`` unless the stage is done with the same config; returns its wall seconds (None: skipped)."""
    if not C.claim_stage(run_dir, name, stage_cfg, force=force):
        missing = [str(p) for p in outputs if not p.exists()]
        if not missing:
            log(f"[{name}] already done in {run_dir} (same config) — skipped")
            return None
        log(f"[{name}] outputs missing ({', '.join(missing)}) — running again")
    start = time.perf_counter()
    detail = fn()
    C.save_stage(run_dir, name, stage_cfg)
    seconds = time.perf_counter() - start
    log(f"[{name}] {detail} ({seconds:.1f} s)")
    return seconds


def _portable(params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Parameters as saved in config/: paths inside the run folder relative to it, so a moved run still matches."""
    def one(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value.relative_to(run_dir)) if value.is_relative_to(run_dir) else str(value)
        return value
    return {k: one(v) for k, v in params.items()}


def _execute(source: Path, stage: Stage, run_dir: Path, log: Callable[[str], None]) -> str:
    """Run one notebook with papermill on a real kernel; its output streams here, the executed copy is kept."""
    import papermill as pm

    params = {k: str(v) if isinstance(v, Path) else v for k, v in stage.params.items()}
    if stage.config is not None:
        path = run_dir / "config" / "inputs" / f"{stage.name}.json"  # the notebook's `config` parameter
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(C.to_dict(stage.config), indent=2), encoding="utf-8")
        params["config"] = str(path)
    out = run_dir / "notebooks" / stage.notebook
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{stage.name}] executing {source / stage.notebook} → {out}")
    try:
        pm.execute_notebook(str(source / stage.notebook), str(out), parameters=params, kernel_name="python3",
                            cwd=str(run_dir), progress_bar=False, log_output=False, stdout_file=sys.stdout,
                            stderr_file=sys.stderr)
    except pm.PapermillExecutionError as err:
        raise RuntimeError(f"notebook {stage.notebook} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
                           f"(the executed copy with the traceback: {out})") from None
    return _SUMMARIES.get(stage.name, lambda r, s: "done")(run_dir, stage)


def _summary_teacher(run_dir: Path, stage: Stage) -> str:
    from . import teacher

    report = teacher.fold_report(run_dir, stage.config.name)
    return f"teacher {stage.config.name}: held-out log loss {_folds_line(report)} (uniform guess 1.0986)"


def _summary_student(run_dir: Path, stage: Stage) -> str:
    from . import distill, teacher

    cfg = stage.config
    report = teacher.fold_report(run_dir, cfg.name, root=distill.student_dir(run_dir, cfg.name))
    return f"student {cfg.name} (from {', '.join(cfg.teachers) or 'labels only'}): held-out log loss {_folds_line(report)}"


def _summary_merge(run_dir: Path, stage: Stage) -> str:
    r = json.loads((run_dir / "merged" / "fidelity.json").read_text())
    return (f"folds merged exactly; holdout log loss ensemble {r['log_loss_ensemble']:.4f}, merged "
            f"{r['log_loss_exact']:.4f}, naive A/B average {r['log_loss_naive']:.4f} (KL to ensemble "
            f"{r['kl_ensemble_exact']:.2e} vs {r['kl_ensemble_naive']:.2e})")


def _summary_quantize(run_dir: Path, stage: Stage) -> str:
    r = json.loads((run_dir / "quantized" / "fidelity.json").read_text())
    return (f"GPTQ {stage.config.bits}-bit ({r['kernel']}, {r['dtype']}): holdout log loss merged "
            f"{r['log_loss_reference']:.4f} → quantised {r['log_loss_quantized']:.4f}, mean KL {r['kl_mean']:.2e}, "
            f"argmax agreement {r['argmax_agreement']:.3f}, {r['bytes_reference'] / 2**20:.0f} → "
            f"{r['bytes_quantized'] / 2**20:.0f} MiB")


def _summary_predict(run_dir: Path, stage: Stage) -> str:
    """The submission must be valid for the whole test file (a dry run's covers only its share: checked on that)."""
    path, test_csv = run_dir / "submission.csv", run_dir / "data" / "test.csv"
    if stage.params["fraction"] < 1:
        return f"dry run: a share of {test_csv.name} scored → {path} (not a full submission)"
    report = parsing.validate_file(path, test_path=test_csv)
    if not report.ok:
        raise parsing.DataError(str(path), [p for p in report.problems if p.fatal])
    return f"{report.summary['rows']} test rows scored by the quantised student → {path} (valid against {test_csv.name})"


_SUMMARIES: dict[str, Callable[[Path, Stage], str]] = {
    "01_teacher_training": _summary_teacher, "02_distillation": _summary_student, "03_lora_merge": _summary_merge,
    "04_quantization": _summary_quantize, "05_inference_2xT4": _summary_predict}


def stage_data(run_dir: Path, cfg: C.SynthConfig, holdout: int = 0) -> str:
    """The synthetic train/test/sample submission, plus ``holdout.csv``: ``holdout`` more labelled rows
    from the same generator that no stage trains on (the merge and quantisation fidelity reports use them)."""
    import dataclasses

    frames = synthetic.generate(dataclasses.replace(cfg, n_train=cfg.n_train + holdout))
    if holdout:
        frames["holdout"] = frames["train"].iloc[cfg.n_train:].reset_index(drop=True)
        frames["train"] = frames["train"].iloc[:cfg.n_train]
    paths = {name: synthetic.write_table(frame, run_dir / "data" / f"{name}.csv") for name, frame in frames.items()}
    test_csv = paths["test"]
    for path in paths.values():
        report = parsing.validate_file(path, test_path=test_csv)
        if not report.ok:
            raise parsing.DataError(str(path), [p for p in report.problems if p.fatal])
    return f"{cfg.n_train} train + {cfg.n_test} test + {holdout} holdout rows written and validated"


def stage_folds(run_dir: Path, cfg: C.FoldConfig) -> str:
    sizes = parsing.write_folds(run_dir / "data" / "train.csv", run_dir / "data" / "folds.parquet", cfg.k, cfg.seed)
    return f"{cfg.k} grouped folds, sizes {sizes}"


def _folds_line(report: Any) -> str:
    return ", ".join(f"{r.fold} {r.best_log_loss:.4f}" for r in report.itertuples())
