"""The prototype recipe from the CLI alone, as a user runs it: `lmsys prepare` → teacher → student (in-fold
targets) → merge → quantize → predict → evaluate, every later stage finding its inputs in the run folder.

Pointed at the small real models (`lmsys fetch-models`) and shrunk with `--set` (64 tokens, 2 steps): the
commands, configs and run-folder layout are the recipe's own. On the real competition rows, with the teacher's
two folds trained in two run folders at different paths (two machines) and gathered into one; it ends with a
submission for the real test rows. (The embedded default goes through the same stages in `lmsys demo`.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lmsys_lib import contract, parsing
from tests.conftest import ROOT

RECIPE = ROOT / "configs" / "recipe" / "prototype"
SMALL = ["pack.max_length=64", "train.max_steps=2", "train.global_batch=0", "train.batch_size=8", "train.grad_accum=1",
         "train.eval_batch_size=16", "train.checkpoint_every=0", "model.lora_r=4", "model.lora_alpha=8",
         "model.gradient_checkpointing=false"]


def lmsys(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", *args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"lmsys {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _teacher(run: str, cwd: Path, model: str, *extra: str) -> str:
    return lmsys("teacher", "--run-dir", run, "--config", str(RECIPE / "teacher-gemma2-2b.json"), "--model-dir", model,
                 "--set", *SMALL, *extra, cwd=cwd)


@pytest.mark.slow
def test_prototype_recipe_runs_from_the_cli_alone(tmp_path, real_sample):
    train_csv, teacher_model = real_sample / "train_head_100.csv", "zoo:gemma3-270m"
    out = lmsys("prepare", "--train", str(train_csv), "--run-dir", "run", "--folds", "2", "--holdout", "0.2",
                cwd=tmp_path)
    assert "holdout rows" in out
    # fold 0 here, fold 1 on "another machine" (another path), gathered
    _teacher("run", tmp_path, teacher_model, "--folds", "0")
    shutil.copytree(tmp_path / "run" / "data", tmp_path / "node2" / "run" / "data")
    shutil.copytree(tmp_path / "run" / "config", tmp_path / "node2" / "run" / "config")
    _teacher("run", tmp_path / "node2", teacher_model, "--folds", "1")
    shutil.copytree(tmp_path / "node2" / "run" / "teachers" / "gemma2-2b" / "fold1",
                    tmp_path / "run" / "teachers" / "gemma2-2b" / "fold1")
    out = _teacher("run", tmp_path, teacher_model)
    assert out.count("already trained — skipped") == 2
    run = tmp_path / "run"
    assert (run / "teachers" / "gemma2-2b" / "oof.parquet").exists() and "temperature T =" in out
    assert all((run / "teachers" / "gemma2-2b" / f"fold{k}" / "train_logits.parquet").exists() for k in (0, 1))

    out = lmsys("distill", "--run-dir", "run", "--config", str(RECIPE / "student-qwen2.5-1.5b.json"), "--model-dir",
                "zoo:smollm2-135m", "--set", *SMALL, cwd=tmp_path)
    assert "targets in_fold" in out and (run / "student" / "qwen2.5-1.5b" / "temperature.json").exists()
    lmsys("merge", "--run-dir", "run", "--name", "qwen2.5-1.5b", cwd=tmp_path)
    merged = contract.read(run / "merged")
    assert merged["pack"].max_length == 64 and merged["pack"].fractions == (0.2, 0.4, 0.4)
    assert merged["temperature"]["value"] > 0 and merged["model"] == "qwen2.5-1.5b"

    out = lmsys("quantize", "--run-dir", "run", "--config", str(RECIPE / "quantize.json"), "--set", "group_size=64",
                "calib_rows=4", "calib_max_length=64", "max_mean_kl=1", "min_agreement=0", cwd=tmp_path)
    report = json.loads((run / "quantized" / "fidelity.json").read_text())
    holdout = parsing.read_competition(run / "data" / "holdout.csv").frame
    assert report["rows"] == len(holdout) and report["passed"]  # the holdout, found without a path flag
    quantized = contract.read(run / "quantized")
    assert quantized["pack"] == merged["pack"] and quantized["quantization"]["bits"] == 8
    assert "kept" in lmsys("quantize", "--run-dir", "run", "--config", str(RECIPE / "quantize.json"), "--set",
                           "group_size=64", "calib_rows=4", "calib_max_length=64", "max_mean_kl=1", "min_agreement=0",
                           cwd=tmp_path)  # a finished stage is a no-op

    out = lmsys("predict", "--run-dir", "run", "--config", str(RECIPE / "inference.json"), "--set",
                "degrade_max_length=64", "token_budget=2048", "--max-length", "64", "--priors-from",
                "run/data/train.csv", cwd=tmp_path)
    assert f"temperature {merged['temperature']['value']:.3f} from run/quantized/lmsys_contract.json" in out
    pred = pd.read_csv(run / "predict" / "holdout_submission.csv")
    assert list(pred["id"]) == list(holdout["id"])
    out = lmsys("evaluate", "--run-dir", "run", "--pred", "run/predict/holdout_submission.csv", cwd=tmp_path)
    assert f"{len(holdout)} rows, log loss" in out
    # and the submission itself, on the real test rows
    lmsys("predict", "--run-dir", "run", "--data", str(real_sample / "test.csv"), "--out", "submission.csv",
          "--max-length", "64", cwd=tmp_path)
    assert parsing.validate_file(tmp_path / "submission.csv", test_path=real_sample / "test.csv").ok
