"""``lmsys demo``: the whole chain on the embedded default, in one run folder.

Stages so far (each guarded by ``config.claim_stage``: re-running a finished stage is a no-op, another
config in the same folder is refused unless forced):

    data       synthetic train/test/sample_submission (competition dialect) → data/*.csv, validated
    folds      grouped k-fold split → data/folds.parquet (id, fold)
    tokenizer  byte-level BPE trained on the train text → tokenizer/ (stands in for a model's tokenizer)
    pack       train and test packed under the token budget → data/packed_{train,test}.parquet
    eda        tables + plots → eda.md, plots/*.png
    teacher    a real small pretrained model (Gemma-3 270M, LoRA) trained on each fold → teachers/<name>/
               (fold adapters, held-out logits, oof.parquet); resumes from its checkpoints when killed
    student    a smaller real model (SmolLM2-135M, LoRA) distilled per fold from the teacher's OOF logits
               → student/<name>/
    merge      the student's fold adapters merged exactly into one checkpoint → merged/, with the
               fidelity report against the fold ensemble on the holdout rows → merged/fidelity.json
    quantize   the merged student GPTQ-quantised to 8 bits (head kept 16-bit) → quantized/, with the
               fidelity report against the merged model on the holdout rows → quantized/fidelity.json
    predict    the quantised student scores test.csv through the inference kernel (swap-TTA, deadline guard,
               checkpoints in predict/) → submission.csv (validated against test.csv)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config as C
from . import distill, eda, merge, parsing, prompting, quantize, synthetic, teacher, zoo


def run(run_dir: str | Path, cfg: C.DemoConfig | None = None, force: bool = False,
        log: Callable[[str], None] = print) -> Path:
    """Run every demo stage into ``run_dir``; returns the run folder."""
    cfg = cfg or C.DemoConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = run_dir / "data"
    stages: list[tuple[str, Any, Callable[[], str], list[Path]]] = [
        ("data", {"synth": C.to_dict(cfg.synth), "holdout": cfg.holdout_rows},
         lambda: stage_data(run_dir, cfg.synth, cfg.holdout_rows),
         [d / "train.csv", d / "test.csv", d / "sample_submission.csv", d / "holdout.csv"]),
        ("folds", cfg.folds, lambda: stage_folds(run_dir, cfg.folds), [d / "folds.parquet"]),
        ("tokenizer", {"vocab": cfg.tokenizer_vocab, "synth": C.to_dict(cfg.synth)},
         lambda: stage_tokenizer(run_dir, cfg.tokenizer_vocab), [run_dir / "tokenizer" / "tokenizer.json"]),
        ("pack", cfg.pack, lambda: stage_pack(run_dir, cfg.pack),
         [d / "packed_train.parquet", d / "packed_test.parquet"]),
        ("eda", cfg.pack, lambda: stage_eda(run_dir), [run_dir / "eda.md"]),
        ("teacher", {"teacher": C.to_dict(cfg.teacher), "folds": C.to_dict(cfg.folds)},
         lambda: stage_teacher(run_dir, cfg.teacher, log),
         [teacher.teacher_dir(run_dir, cfg.teacher.name) / "oof.parquet"]),
        ("student", {"student": C.to_dict(cfg.student), "teacher": C.to_dict(cfg.teacher)},
         lambda: stage_student(run_dir, cfg.student, log),
         [distill.student_dir(run_dir, cfg.student.name) / "oof.parquet"]),
        ("merge", {"student": C.to_dict(cfg.student)}, lambda: stage_merge(run_dir, cfg.student, log),
         [run_dir / "merged" / "config.json", run_dir / "merged" / "fidelity.json"]),
        ("quantize", {"student": C.to_dict(cfg.student), "quantize": C.to_dict(cfg.quantize)},
         lambda: stage_quantize(run_dir, cfg.student.pack, cfg.quantize, log),
         [run_dir / "quantized" / "config.json", run_dir / "quantized" / "fidelity.json"]),
        ("predict", {"student": C.to_dict(cfg.student), "quantize": C.to_dict(cfg.quantize),
                     "inference": C.to_dict(cfg.inference)},
         lambda: stage_predict(run_dir, cfg.student.pack, cfg.inference, log), [run_dir / "submission.csv"]),
    ]
    for name, stage_cfg, fn, outputs in stages:
        if not C.claim_stage(run_dir, name, stage_cfg, force=force):
            missing = [str(p) for p in outputs if not p.exists()]
            if not missing:
                log(f"[{name}] already done in {run_dir} (same config) — skipped")
                continue
            log(f"[{name}] outputs missing ({', '.join(missing)}) — running again")
        start = time.perf_counter()
        detail = fn()
        C.save_stage(run_dir, name, stage_cfg)
        log(f"[{name}] {detail} ({time.perf_counter() - start:.1f} s)")
    return run_dir


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


def stage_tokenizer(run_dir: Path, vocab: int) -> str:
    frame = parsing.read_competition(run_dir / "data" / "train.csv").frame
    tok = zoo.demo_tokenizer(run_dir / "tokenizer", frame, vocab_size=vocab)
    return f"byte-level BPE, {len(tok)} tokens"


def stage_pack(run_dir: Path, cfg: C.PackConfig) -> str:
    from transformers import AutoTokenizer

    packer = prompting.Packer(AutoTokenizer.from_pretrained(run_dir / "tokenizer"), cfg)
    notes = []
    for split in ("train", "test"):
        frame = parsing.read_competition(run_dir / "data" / f"{split}.csv").frame
        packed = packer.pack_frame(frame, progress=True)
        packed.to_parquet(run_dir / "data" / f"packed_{split}.parquet")
        notes.append(f"{split}: mean {packed['n_tokens'].mean():.0f} ids, {packed['truncated'].mean():.1%} cut")
    return f"max_length {cfg.max_length}; " + "; ".join(notes)


def stage_eda(run_dir: Path) -> str:
    from transformers import AutoTokenizer

    frame = parsing.read_competition(run_dir / "data" / "train.csv").frame
    path = eda.write_report(frame, AutoTokenizer.from_pretrained(run_dir / "tokenizer"), run_dir,
                            title="EDA — embedded default")
    return f"report {path}"


def stage_teacher(run_dir: Path, cfg: C.TeacherConfig, log: Callable[[str], None]) -> str:
    teacher.run(run_dir, cfg, log=log)
    return f"teacher {cfg.name}: held-out log loss {_folds_line(teacher.fold_report(run_dir, cfg.name))} (uniform guess 1.0986)"


def stage_student(run_dir: Path, cfg: C.DistillConfig, log: Callable[[str], None]) -> str:
    distill.run(run_dir, cfg, log=log)
    report = teacher.fold_report(run_dir, cfg.name, root=distill.student_dir(run_dir, cfg.name))
    return f"student {cfg.name} (from {', '.join(cfg.teachers) or 'labels only'}): held-out log loss {_folds_line(report)}"


def stage_merge(run_dir: Path, cfg: C.DistillConfig, log: Callable[[str], None]) -> str:
    import json

    base = zoo.resolve_model_dir(cfg.model.model_dir)
    adapters = merge.read_adapters(merge.fold_adapters(distill.student_dir(run_dir, cfg.name)))
    out = merge.merge_exact(base, adapters, run_dir / "merged", log=log)
    holdout = parsing.read_competition(run_dir / "data" / "holdout.csv").frame
    report = merge.fidelity_report(base, adapters, out, holdout, cfg.pack, work_dir=run_dir / "merge-work", log=log)
    saved = {k: v for k, v in report.items() if k != "probs"}
    (out / "fidelity.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return (f"{len(adapters)} folds merged exactly; holdout log loss ensemble {report['log_loss_ensemble']:.4f}, "
            f"merged {report['log_loss_exact']:.4f}, naive A/B average {report['log_loss_naive']:.4f} "
            f"(KL to ensemble {report['kl_ensemble_exact']:.2e} vs {report['kl_ensemble_naive']:.2e})")


def stage_quantize(run_dir: Path, pack: C.PackConfig, cfg: C.QuantizeConfig, log: Callable[[str], None]) -> str:
    report = quantize.run(run_dir / "merged", run_dir / "quantized", run_dir / "data" / "train.csv",
                          run_dir / "data" / "holdout.csv", pack, cfg, log=log)
    return (f"GPTQ {cfg.bits}-bit ({report['kernel']}, {report['dtype']}): holdout log loss merged "
            f"{report['log_loss_reference']:.4f} → quantised {report['log_loss_quantized']:.4f}, mean KL "
            f"{report['kl_mean']:.2e}, argmax agreement {report['argmax_agreement']:.3f}, "
            f"{report['bytes_reference'] / 2**20:.0f} → {report['bytes_quantized'] / 2**20:.0f} MiB")


def stage_predict(run_dir: Path, pack: C.PackConfig, cfg: C.InferenceConfig, log: Callable[[str], None]) -> str:
    """The quantised student on test.csv through the inference kernel (the training prompt format, swap-TTA,
    deadline guard, checkpoints in predict/) → submission.csv, validated against test.csv."""
    import dataclasses

    from . import inference

    cfg = dataclasses.replace(cfg, pack=dataclasses.replace(pack, max_length=cfg.pack.max_length))
    models, tokenizer, info = inference.load_models(run_dir / "quantized", inference.devices_for("auto"), log=log)
    priors = inference.measure_priors(parsing.read_competition(run_dir / "data" / "train.csv").frame)
    test = parsing.read_competition(run_dir / "data" / "test.csv", on_bad_cell="text").frame
    probs, report = inference.score(models, tokenizer, test, cfg, work_dir=run_dir / "predict",
                                            priors=priors, log=log)
    path = inference.write_submission(test["id"].tolist(), probs, run_dir / "submission.csv")
    report_ok = parsing.validate_file(path, test_path=run_dir / "data" / "test.csv")
    if not report_ok.ok:
        raise parsing.DataError(str(path), [p for p in report_ok.problems if p.fatal])
    return (f"{len(test)} test rows scored by the quantised student ({info['kernel']}, TTA "
            f"{'on' if cfg.tta else 'off'}) → {path}; sources {report['sources']}")


def _folds_line(report: Any) -> str:
    return ", ".join(f"{r.fold} {r.best_log_loss:.4f}" for r in report.itertuples())
