"""Student stage: teacher logits joined by id and validated, swap-consistent loss, k-fold run through the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys_lib import demo, distill, losses, merge, modeling, parsing, teacher
from lmsys_lib.config import DistillConfig, FoldConfig, SynthConfig
from lmsys_lib.train import TrainData


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A 240-row run with a tiny teacher's OOF logits (2 folds) and a tiny student checkpoint."""
    run = tmp_path_factory.mktemp("distill")
    demo.stage_data(run, SynthConfig(n_train=240, n_test=10, seed=8))
    demo.stage_folds(run, FoldConfig(k=2, seed=0))
    for name, hidden in (("tiny-teacher", 96), ("tiny-student", 64)):
        modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), run / "models" / name, hidden=hidden,
                                      intermediate=2 * hidden)
    cfg = {"name": "t1", "model": {"model_dir": str(run / "models" / "tiny-teacher"), "lora_r": 0},
           "train": {"max_steps": 3, "batch_size": 16, "eval_every": 0, "checkpoint_every": 0},
           "pack": {"max_length": 96}}
    (run / "t1.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(run), "--config",
                           str(run / "t1.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _student_json(run, path, **overrides):
    cfg = {"name": "s", "model": {"model_dir": str(run / "models" / "tiny-student"), "lora_r": 4, "lora_alpha": 8},
           "train": {"max_steps": 3, "batch_size": 16, "eval_every": 0, "checkpoint_every": 0},
           "pack": {"max_length": 96}, "teachers": ["t1"]} | overrides
    path.write_text(json.dumps(cfg))
    return path


def test_teacher_table_aligns_by_id_and_names_bad_ids(run, tmp_path):
    frame, _ = teacher.load_split(run)
    ids = frame["id"].to_numpy()
    table = distill.teacher_table(run, ["t1"], ids)
    oof = pd.read_parquet(run / "teachers" / "t1" / "oof.parquet").set_index("id")
    logits, mask = table.rows(ids[[5, 0]])
    assert np.allclose(logits[:, 0], oof.loc[ids[[5, 0]], ["logit_a", "logit_b", "logit_tie"]].to_numpy())
    assert mask.all()

    bad = run / "teachers" / "bad"
    bad.mkdir()
    broken = pd.read_parquet(run / "teachers" / "t1" / "oof.parquet")
    broken = pd.concat([broken.iloc[2:], broken.iloc[[2]]])  # ids[0:2] missing, one duplicated
    broken.to_parquet(bad / "oof.parquet")
    missing = sorted(set(ids) - set(broken["id"]))
    with pytest.raises(ValueError, match=rf"duplicated ids \[{broken['id'].iloc[-1]}\].*missing ids"):
        distill.teacher_table(run, ["bad"], ids)
    with pytest.raises(ValueError, match=str(missing[0])):
        distill.teacher_table(run, ["bad"], ids)
    partial = broken.iloc[:-1]
    partial.to_parquet(bad / "oof.parquet")
    table = distill.teacher_table(run, ["t1", "bad"], ids, allow_missing=True)
    assert table.mask[:, 0].all() and (~table.mask[:, 1]).sum() == len(missing)
    with pytest.raises(FileNotFoundError, match="run its teacher stage"):
        distill.teacher_table(run, ["nobody"], ids)


def test_a_swapped_row_sees_its_teacher_distribution_swapped_too():
    """Loss of a row shown A/B-swapped (student logits and label permuted) equals the unswapped row's."""
    rng = np.random.default_rng(0)
    ids = np.arange(6)
    table = distill.TeacherTable(ids, rng.normal(size=(6, 2, 3)).astype(np.float32), np.ones((6, 2), bool),
                                 ("a", "b"))
    data = TrainData(ids, [np.array([1])] * 6, [np.array([1])] * 6, np.array([0, 1, 2, 0, 1, 2]))
    for mode in ("kl", "winner"):
        fn = distill.make_loss(table, data, DistillConfig(teachers=("a", "b"), loss=mode, temperature=2.0,
                                                          teacher_weights=(0.3, 0.7)))
        student = torch.tensor(rng.normal(size=(6, 3)), dtype=torch.float32)
        rows = np.arange(6)
        plain = fn(student, torch.tensor(data.labels), rows, np.zeros(6, bool))
        swapped_labels = torch.tensor(parsing.swap_labels(data.labels))
        swapped = fn(student[:, list(parsing.AB_SWAP)], swapped_labels, rows, np.ones(6, bool))
        assert float(swapped) == pytest.approx(float(plain), rel=1e-6)
        wrong = losses.distill_sum(student[:, list(parsing.AB_SWAP)], swapped_labels,
                                   torch.from_numpy(table.logits), mode=mode, temperature=2.0)
        assert float(wrong) != pytest.approx(float(plain), rel=1e-3)  # not permuting would change the loss


def test_student_folds_distil_write_oof_and_merge(run, tmp_path):
    cfg = _student_json(run, tmp_path / "s.json")
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "distill", "--run-dir", str(run), "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distilling from t1 (kl, T = 1.0, targets in_fold)" in proc.stdout
    frame, folds = teacher.load_split(run)
    oof = pd.read_parquet(run / "student" / "s" / "oof.parquet")
    assert sorted(oof["id"]) == sorted(frame["id"]) and oof["id"].is_unique and (oof["teacher"] == "s").all()
    assert (run / "config" / "student-s.json").exists()

    base = run / "models" / "tiny-student"
    out = subprocess.run([sys.executable, "-m", "lmsys_lib", "merge", "--base", str(base), "--folds-dir",
                          str(run / "student" / "s"), "--out", str(tmp_path / "merged")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "naive A/B averaging would be off by" in out.stdout
    from lmsys_lib.config import PackConfig

    holdout = parsing.read_competition(run / "data" / "train.csv").frame.iloc[:24]
    report = merge.fidelity_report(base, merge.fold_adapters(run / "student" / "s"), tmp_path / "merged", holdout,
                                   PackConfig(max_length=96), log=lambda _: None)
    for key in ("log_loss_ensemble", "log_loss_exact", "log_loss_naive", "kl_ensemble_exact",
                "argmax_agreement_exact", "log_loss_naive_minus_exact"):
        assert np.isfinite(report[key]), key
    assert report["kl_ensemble_exact"] >= 0 and 0 <= report["argmax_agreement_exact"] <= 1
    assert len(merge.report_table(report)) == 3 + 3 and merge.plot_report(report) is not None  # + 3 storages


def test_student_without_teachers_is_the_hard_label_baseline_and_other_config_is_refused(run, tmp_path):
    cfg = _student_json(run, tmp_path / "b.json", name="ce", teachers=[], folds=[0])
    command = [sys.executable, "-m", "lmsys_lib", "distill", "--run-dir", str(run), "--config", str(cfg)]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distilling" not in proc.stdout and (run / "student" / "ce" / "fold0" / "metrics.json").exists()
    assert not (run / "student" / "ce" / "oof.parquet").exists()  # fold 1 not trained yet
    _student_json(run, cfg, name="ce", teachers=[], folds=[1], temperature=3.0)
    clash = subprocess.run(command, capture_output=True, text=True)
    assert clash.returncode == 2 and "holds another config" in clash.stderr


def test_in_fold_targets_never_see_the_labels_of_the_student_held_out_fold(run, tmp_path):
    """Relabel every row of fold 0 and train the teacher again: student fold 0's in-fold targets are unchanged
    bit for bit (teacher fold 0 never saw fold 0), while its OOF targets move (teacher fold 1 trained on it)."""
    import shutil

    other = tmp_path / "relabelled"
    shutil.copytree(run / "data", other / "data")
    frame, fold_of = teacher.load_split(run)
    raw = parsing.read_table(run / "data" / "train.csv")
    labels = raw[list(parsing.LABEL_COLUMNS)].to_numpy()
    raw.loc[fold_of == 0, list(parsing.LABEL_COLUMNS)] = np.roll(labels[fold_of == 0], 1, axis=1)
    parsing.write_table(raw, other / "data" / "train.csv")
    assert (teacher.load_split(other)[0]["label"].to_numpy() != frame["label"].to_numpy()).sum() == (fold_of == 0).sum()
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(other), "--config",
                           str(run / "t1.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ids, held = frame["id"].to_numpy()[fold_of != 0], frame["id"].to_numpy()[fold_of == 0]
    cfg = DistillConfig(teachers=("t1",))
    before, after = (distill.targets_for(r, cfg, 0, ids, held) for r in (run, other))
    assert np.array_equal(before.logits, after.logits) and before.mask.all()
    oof = DistillConfig(teachers=("t1",), targets="oof")
    before_oof, after_oof = (distill.targets_for(r, oof, 0, ids, held).rows(ids)[0] for r in (run, other))
    assert not np.allclose(before_oof, after_oof)  # the leak the in-fold default avoids
    leaky = other / "teachers" / "leaky" / "fold0"  # a teacher fold 0 trained on other folds: it saw fold 0
    leaky.mkdir(parents=True)
    shutil.copy(other / "teachers" / "t1" / "fold1" / "train_logits.parquet", leaky / "train_logits.parquet")
    with pytest.raises(ValueError, match=rf"leaky fold 0 .*trained on {len(held)} row\(s\) of the student's held-out fold 0"):
        distill.targets_for(other, DistillConfig(teachers=("leaky",)), 0, ids, held)


def test_the_run_merge_checks_its_folds_and_base_and_keeps_only_what_is_current(run, tmp_path):
    """merge.run: every fold finished, onto the base the folds were trained from; a finished merge is kept only
    while the adapters' content (not their size) and the base are unchanged."""
    import shutil

    from lmsys_lib import contract

    if not (run / "student" / "s" / "oof.parquet").exists():  # run alone: train the student first
        proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "distill", "--run-dir", str(run), "--config",
                               str(_student_json(run, tmp_path / "s.json"))], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "run"
    shutil.copytree(run / "data", work / "data")
    shutil.copytree(run / "student" / "s", work / "student" / "s")
    said = []
    out = merge.run(work, "s", log=said.append)  # the base: the one named at launch, found in the run
    assert contract.read(out)["pack"].max_length == 96
    merge.run(work, "s", log=said.append)
    assert "merged onto this base already" in said[-1]
    adapter = work / "student" / "s" / "fold1" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0  # same shapes, same file size, other content
    size = adapter.stat().st_size
    save_file(tensors, adapter, metadata={"format": "pt"})
    assert adapter.stat().st_size == size
    said.clear()
    merge.run(work, "s", log=said.append)
    assert not any("already" in line for line in said)
    with pytest.raises(ValueError, match="is not the base"):
        merge.run(work, "s", base=str(run / "models" / "tiny-teacher"), force=True, log=said.append)
    (work / "student" / "s" / "fold0" / "metrics.json").unlink()
    with pytest.raises(ValueError, match=r"folds \[0\] of 2 are not finished"):
        merge.run(work, "s", force=True, log=said.append)


def test_the_student_post_pretrains_like_a_teacher_and_merges_onto_that_base(run, tmp_path):
    """DistillConfig.pretrain: the student trains on extra data first (train rows repeated there dropped), its
    folds start from that merged checkpoint, and merge.run finds it as the base."""
    work = tmp_path / "run"
    import shutil

    shutil.copytree(run / "data", work / "data")
    shutil.copytree(run / "teachers" / "t1", work / "teachers" / "t1")
    extra = synthetic_extra(work)
    cfg = _student_json(run, tmp_path / "pre.json", name="pre", folds=[0, 1],
                        pretrain={"data": [str(extra)], "train": {"max_steps": 2, "batch_size": 8, "eval_every": 0}})
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "distill", "--run-dir", str(work), "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 60 extra rows (10 repeating train rows and 0 duplicates dropped)" in proc.stdout
    base = work / "student" / "pre" / "pretrained" / "merged"
    fit = json.loads((work / "student" / "pre" / "fold0" / "fit_config.json").read_text())
    assert fit["model"]["model_dir"]["name"] == "merged" and (base / "config.json").exists()
    assert merge.fold_base(work / "student" / "pre") == str(base)
    merged = merge.run(work, "pre", log=lambda _: None)
    assert json.loads((merged / "lmsys_merge.json").read_text())["base"] == str(base)


def synthetic_extra(work):
    """60 new conversations in the competition layout + 10 that repeat the run's train rows."""
    from lmsys_lib import synthetic

    new = synthetic.generate(SynthConfig(n_train=60, n_test=1, seed=123))["train"]
    repeat = parsing.read_table(work / "data" / "train.csv").iloc[:10]
    path = work / "extra.csv"
    synthetic.write_table(pd.concat([new, repeat], ignore_index=True), path)
    return path
