"""Training: schedule, stream, learning on the synthetic signal, kill-and-resume, OOF logits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmsys_lib import modeling, synthetic, teacher, train
from lmsys_lib.config import PretrainConfig, SynthConfig, TrainConfig
from tests.conftest import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run folder with synthetic data, grouped folds and a tiny Llama checkpoint."""
    return tiny_run(tmp_path_factory.mktemp("run"), tokenizer, 2000, 3, 5, hidden=128, intermediate=256)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tokenizer):
    """A 300-row run folder (3 folds) for the tests that train many short runs."""
    return tiny_run(tmp_path_factory.mktemp("small"), tokenizer, 300, 3, 6)


def _teacher_json(path: Path, run_dir: Path, max_length: int = 192, **train_overrides) -> Path:
    """A full fine-tuning config for the tiny from-scratch Llama. Its head keeps the checkpoint's init
    (std 0.02): a random body's hidden states are small, and the smaller "scaled" head — right for
    pretrained decoders — slows the gradient into the body (held-out 1.088 instead of ≈ 0.97 here)."""
    cfg = {
        "name": "tiny",
        "model": {"model_dir": str(run_dir / "models" / "tiny-llama"), "lora_r": 0, "head_init": "model"},
        "train": {"epochs": 3.0, "batch_size": 16, "grad_accum": 1, "lr": 1e-3, "eval_every": 25,
                  "checkpoint_every": 0, "warmup_ratio": 0.05, "weight_decay": 0.1} | train_overrides,
        "pack": {"max_length": max_length},
    }
    path.write_text(json.dumps(cfg))
    return path


def test_lr_schedule_warms_up_then_decays():
    f = [train.lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1)


def test_stream_is_deterministic_and_covers_rows():
    lengths = np.random.default_rng(0).integers(10, 500, size=103)
    cfg = TrainConfig(epochs=2.0, batch_size=4, grad_accum=3, seed=1)
    one = train.Stream(lengths, cfg, world_size=1)
    again = train.Stream(lengths, cfg, world_size=1)
    steps = [one.step(s) for s in range(one.total_steps)]
    assert all(len(s) <= 3 for s in steps)
    rows = [r for s in steps for rows, _ in s for r in rows]
    assert len(rows) == 2 * 103 and sorted(rows[:103]) == list(range(103))  # each row once per epoch
    assert all(np.array_equal(a[1], b[1]) and a[0] == b[0]
               for s in range(one.total_steps) for a, b in zip(one.step(s), again.step(s)))
    swapped = np.concatenate([sw for s in steps for _, sw in s])
    assert 0.35 < swapped.mean() < 0.65  # swap augmentation, p = 0.5
    # 2 processes × accumulation 1 see, step by step, exactly the rows of 1 process × accumulation 2
    two = train.Stream(lengths, TrainConfig(epochs=2.0, batch_size=4, grad_accum=1, seed=1), world_size=2)
    acc = train.Stream(lengths, TrainConfig(epochs=2.0, batch_size=4, grad_accum=2, seed=1), world_size=1)
    assert two.total_steps == acc.total_steps
    assert all([r for r, _ in two.step(s)] == [r for r, _ in acc.step(s)] for s in range(two.total_steps))


def test_training_learns_the_synthetic_signal(run_dir, tmp_path):
    cfg = _teacher_json(tmp_path / "t.json", run_dir)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(run_dir),
                           "--config", str(cfg), "--folds", "0", "--name", "learn"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "teachers" / "learn" / "fold0" / "metrics.json").read_text())
    # uniform guessing scores 1.0986; a tiny model trained from scratch on 1,300 rows reaches ≈ 0.97
    assert metrics["best_eval_log_loss"] < 1.05, metrics["history"]
    logits = pd.read_parquet(run_dir / "teachers" / "learn" / "fold0" / "eval_logits.parquet")
    _, folds = teacher.load_split(run_dir)
    assert len(logits) == int((folds == 0).sum()) and logits["id"].is_unique
    assert (run_dir / "teachers" / "learn" / "fold0" / "adapter" / "model.safetensors").exists()


def test_kill_and_resume_ends_with_the_same_adapter(small_run, tmp_path):
    run_dir = small_run
    cfg = _teacher_json(tmp_path / "t.json", run_dir, epochs=4.0, batch_size=4, max_steps=40, eval_every=5,
                        checkpoint_every=2)
    base = [sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(run_dir), "--config", str(cfg),
            "--folds", "1"]
    straight = subprocess.run(base + ["--name", "straight"], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    fold = run_dir / "teachers" / "killed" / "fold1"
    proc = subprocess.Popen(base + ["--name", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((fold / "checkpoints").glob("step-00002[0-9]")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (fold / "metrics.json").exists(), "the run finished before it was killed"
    resumed = subprocess.run(base + ["--name", "killed"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    from safetensors.numpy import load_file

    a = load_file(run_dir / "teachers" / "straight" / "fold1" / "adapter" / "model.safetensors")
    b = load_file(fold / "adapter" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit for bit
    la = pd.read_parquet(run_dir / "teachers" / "straight" / "fold1" / "eval_logits.parquet")
    lb = pd.read_parquet(fold / "eval_logits.parquet")
    pd.testing.assert_frame_equal(la, lb)


def test_oof_covers_every_id_exactly_once(small_run, tmp_path):
    run_dir = small_run
    cfg = _teacher_json(tmp_path / "t.json", run_dir, epochs=0.3, max_steps=4, eval_every=0)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(run_dir),
                           "--config", str(cfg), "--name", "oof"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame, folds = teacher.load_split(run_dir)
    oof = pd.read_parquet(run_dir / "teachers" / "oof" / "oof.parquet")
    assert list(oof.columns) == list(teacher.OOF_COLUMNS)
    assert sorted(oof["id"]) == sorted(frame["id"]) and oof["id"].is_unique
    fold_of = dict(zip(frame["id"], folds))
    assert all(fold_of[i] == f for i, f in zip(oof["id"], oof["fold"]))  # logits from the fold that held it out
    assert (oof["teacher"] == "oof").all() and np.isfinite(oof[["logit_a", "logit_b", "logit_tie"]]).all().all()
    assert len(teacher.read_oof(run_dir, ["oof"], frame["id"].to_numpy())) == len(frame)


def test_two_processes_with_accelerate_agree_with_one(small_run, tmp_path):
    """accelerate's launcher, 2 CPU processes over gloo (DDP), against 1 process with 2× accumulation."""
    root = Path(__file__).resolve().parents[1]
    steps = {"max_steps": 6, "batch_size": 4, "eval_every": 0, "checkpoint_every": 3, "global_batch": 8}
    two = _teacher_json(tmp_path / "two.json", small_run, max_length=128, **steps)  # the same config: a global
    one = _teacher_json(tmp_path / "one.json", small_run, max_length=128, **steps)  # batch, not a process count
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(root / "configs" / "accelerate" / "cpu2.yaml"), "-m", "lmsys_lib", "teacher",
              "--run-dir", str(small_run), "--config", str(two), "--folds", "0", "--name", "ddp"]
    proc = subprocess.run(launch, capture_output=True, text=True, env=os.environ | {"ACCELERATE_USE_CPU": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(small_run),
                             "--config", str(one), "--folds", "0", "--name", "single"],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = json.loads((small_run / "teachers" / "ddp" / "fold0" / "metrics.json").read_text())
    ref = json.loads((small_run / "teachers" / "single" / "fold0" / "metrics.json").read_text())
    assert ddp["processes"] == 2 and len(set(ddp["rank_checksums"])) == 1  # both ranks hold the same weights
    assert ddp["rank_checksums"][0] == pytest.approx(ref["rank_checksums"][0], rel=1e-6)
    from safetensors.numpy import load_file

    a = load_file(small_run / "teachers" / "ddp" / "fold0" / "adapter" / "model.safetensors")
    b = load_file(small_run / "teachers" / "single" / "fold0" / "adapter" / "model.safetensors")
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_run_folder_is_portable_and_a_failed_launch_locks_nothing(small_run, tmp_path):
    """Moved to another path with its model at another path, the run resumes; a launch that died before its
    first checkpoint does not lock the name; other settings are refused unless forced."""
    import shutil

    run = tmp_path / "node1" / "run"
    shutil.copytree(small_run / "data", run / "data")
    shutil.copytree(small_run / "models" / "tiny-llama", tmp_path / "node1" / "tiny-llama")
    base = {"max_steps": 2, "eval_every": 0, "global_batch": 16}

    def teacher_cli(run_dir, cfg, *flags):
        return subprocess.run([sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(run_dir), "--config",
                               str(cfg), "--folds", "0", *flags], capture_output=True, text=True)

    broken = _teacher_json(tmp_path / "broken.json", run, max_length=128, **base)
    data = json.loads(broken.read_text())
    data["model"]["model_dir"] = str(tmp_path / "no-such-model")
    broken.write_text(json.dumps(data))
    died = teacher_cli(run, broken)
    assert died.returncode == 2 and "no-such-model" in died.stderr  # dies loading the model: nothing trained
    good = _teacher_json(tmp_path / "good.json", run, max_length=128, **base)
    data = json.loads(good.read_text())
    data["model"]["model_dir"] = str(tmp_path / "node1" / "tiny-llama")
    good.write_text(json.dumps(data))
    first = teacher_cli(run, good)
    assert first.returncode == 0 and "nothing was trained under it: replaced" in first.stdout, first.stderr[-2000:]

    shutil.copytree(tmp_path / "node1", tmp_path / "node2")  # another machine, other mount paths
    data["model"]["model_dir"] = str(tmp_path / "node2" / "tiny-llama")
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(data))
    again = teacher_cli(tmp_path / "node2" / "run", moved)
    assert again.returncode == 0 and "fold 0 already trained — skipped" in again.stdout, again.stderr[-2000:]

    data["train"]["lr"] = 5e-4
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    clash = teacher_cli(tmp_path / "node2" / "run", other)
    assert clash.returncode == 2 and "fold0 trained under it" in clash.stderr
    forced = teacher_cli(tmp_path / "node2" / "run", other, "--force")
    assert forced.returncode == 0 and "forced: fold0" in forced.stdout, forced.stderr[-2000:]
    fit = json.loads((tmp_path / "node2" / "run" / "teachers" / "tiny" / "fold0" / "fit_config.json").read_text())
    assert fit["train"]["lr"] == 5e-4 and "processes" not in fit  # a global batch: any process count


def test_global_batch_makes_the_stream_independent_of_the_process_count():
    cfg = TrainConfig(batch_size=4, global_batch=16, epochs=1.0)
    lengths = np.random.default_rng(0).integers(10, 200, size=203)
    one, two, four = (train.Stream(lengths, cfg, w) for w in (1, 2, 4))
    assert one.total_steps == two.total_steps == four.total_steps
    def plain(stream, s):
        return [(list(rows), [bool(x) for x in swapped]) for rows, swapped in stream.step(s)]

    assert all(plain(one, s) == plain(two, s) == plain(four, s) for s in range(one.total_steps))
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        train.Stream(lengths, cfg, 3)
    m = {"model_dir": "zoo:x"}
    from lmsys_lib.config import ModelConfig

    assert train.fit_identity(ModelConfig(**m), cfg, 1) == train.fit_identity(ModelConfig(**m), cfg, 8)
    legacy = TrainConfig(batch_size=4, grad_accum=2)
    assert train.fit_identity(ModelConfig(**m), legacy, 1) != train.fit_identity(ModelConfig(**m), legacy, 2)


def test_check_oof_names_bad_ids():
    ids = np.array([1, 2, 3])
    oof = pd.DataFrame({"id": [1, 1, 4], "fold": 0, "logit_a": [0.0, 0.0, np.nan], "logit_b": 0.0,
                        "logit_tie": 0.0, "teacher": "t"})
    with pytest.raises(ValueError, match=r"duplicated ids \[1\].*missing ids \[2, 3\].*unknown ids \[4\]"):
        teacher.check_oof(oof, ids)


def _extra_csv(run: Path) -> Path:
    """An extra preference set in the 33k-set layout: 150 new conversations + 20 that repeat train rows."""
    out = run / "extra"
    if not (out / "extra.csv").exists():
        new = pd.read_csv(synthetic.write(SynthConfig(n_train=150, n_test=1, seed=99), out)["train"])
        train_rows = pd.read_csv(run / "data" / "train.csv").iloc[:20]
        pd.concat([new, train_rows], ignore_index=True).to_csv(out / "extra.csv", index=False)
    return out / "extra.csv"


def test_post_pretrain_merges_into_a_plain_checkpoint(small_run):
    """Post-pretrain with LoRA on extra data, merged in fp32: the merged checkpoint loads with plain
    from_pretrained and predicts what base + adapter predicts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmsys_lib import batching as B
    from lmsys_lib.config import ModelConfig, PackConfig

    model_cfg = ModelConfig(model_dir=str(small_run / "models" / "tiny-llama"), lora_r=4, lora_alpha=8,
                            lora_dropout=0.0)
    cfg = PretrainConfig(data=(str(_extra_csv(small_run)),), held_out_share=0.2,
                         train=TrainConfig(max_steps=3, batch_size=8, grad_accum=1, lr=1e-2, eval_every=0,
                                           checkpoint_every=0))
    result = teacher.post_pretrain(small_run, teacher.teacher_dir(small_run, "pre"), cfg, model_cfg, PackConfig(max_length=128))
    tok = modeling.load_tokenizer(result.model_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    base = AutoModelForSequenceClassification.from_pretrained(model_cfg.model_dir, num_labels=3)
    base.config.pad_token_id = tok.pad_token_id
    adapted = PeftModel.from_pretrained(base, small_run / "teachers" / "pre" / "pretrained" / "adapter").eval()
    batch = B.collate([tok("a short row")["input_ids"], tok("a somewhat longer second row here")["input_ids"]],
                      tok.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-5)
    assert merged.config.num_labels == 3 and merged.config.pad_token_id == tok.pad_token_id
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_teacher_config_post_pretrains_then_trains_folds_from_the_merged_base(small_run, tmp_path):
    """Post-pretraining wired into the teacher stage: train rows repeated in the extra data are dropped,
    the folds start from the merged base, and a second run reuses the finished post-pretraining."""
    cfg = json.loads(_teacher_json(tmp_path / "t.json", small_run, max_length=96, max_steps=2, batch_size=8,
                                   eval_every=0).read_text())
    cfg["model"] = {"model_dir": cfg["model"]["model_dir"], "lora_r": 4, "lora_alpha": 8}
    cfg |= {"name": "withpre", "folds": [0],
            "pretrain": {"data": [str(_extra_csv(small_run))],
                         "train": {"max_steps": 2, "batch_size": 8, "grad_accum": 1, "eval_every": 0}}}
    (tmp_path / "t.json").write_text(json.dumps(cfg))
    command = [sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(small_run),
               "--config", str(tmp_path / "t.json")]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 150 extra rows (20 repeating train rows and 0 duplicates dropped)" in proc.stdout
    merged = small_run / "teachers" / "withpre" / "pretrained" / "merged"
    assert (merged / "model.safetensors").exists()
    fit = json.loads((small_run / "teachers" / "withpre" / "fold0" / "fit_config.json").read_text())
    import hashlib  # the fold names its base portably: the merged folder's name and content, not its path
    assert fit["model"]["model_dir"]["name"] == "merged"
    assert fit["model"]["model_dir"]["config_sha256"] == hashlib.sha256((merged / "config.json").read_bytes()).hexdigest()
    again = subprocess.run(command + ["--folds", "1"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "post-pretraining already done" in again.stdout


def test_oof_waits_for_every_fold_to_finish(small_run, tmp_path):
    """A fold killed after its first evaluation has eval_logits.parquet but no metrics.json: no OOF file yet."""
    cfg = _teacher_json(tmp_path / "t.json", small_run, max_length=96, max_steps=2, batch_size=8, eval_every=0)
    command = [sys.executable, "-m", "lmsys_lib", "teacher", "--run-dir", str(small_run), "--config", str(cfg),
               "--name", "unfinished"]
    assert subprocess.run(command + ["--folds", "0", "1", "2"], capture_output=True, text=True).returncode == 0
    root = small_run / "teachers" / "unfinished"
    (root / "oof.parquet").unlink()
    (root / "fold2" / "metrics.json").unlink()  # as if killed mid-fold
    proc = subprocess.run(command + ["--folds", "0"], capture_output=True, text=True)
    assert proc.returncode == 0 and not (root / "oof.parquet").exists()


def test_full_fine_tuning_post_pretrain_starts_the_folds_from_its_checkpoint(small_run):
    from lmsys_lib.config import ModelConfig, PackConfig

    model_cfg = ModelConfig(model_dir=str(small_run / "models" / "tiny-llama"), lora_r=0, head_init="model")
    cfg = PretrainConfig(data=(str(_extra_csv(small_run)),), held_out_share=0.2,
                         train=TrainConfig(max_steps=2, batch_size=8, grad_accum=1, eval_every=0, checkpoint_every=0))
    first = teacher.post_pretrain(small_run, teacher.teacher_dir(small_run, "fullpre"), cfg, model_cfg, PackConfig(max_length=96), log=lambda _: None)
    assert (first.model_dir / "config.json").exists()
    said = []
    again = teacher.post_pretrain(small_run, teacher.teacher_dir(small_run, "fullpre"), cfg, model_cfg, PackConfig(max_length=96), log=said.append)
    assert again.model_dir == first.model_dir and "already done" in said[0]


def test_swap_pairs_put_each_row_and_its_swap_in_one_micro_batch():
    lengths = np.random.default_rng(1).integers(10, 400, size=37)
    cfg = TrainConfig(epochs=1.0, batch_size=6, grad_accum=2, swap_pairs=True, seed=3)
    stream = train.Stream(lengths, cfg, world_size=1)
    micro = [m for s in range(stream.total_steps) for m in stream.step(s)]
    for rows, swapped in micro:
        half = len(rows) // 2
        assert len(rows) <= 6 and rows[:half] == rows[half:]  # the same rows, as is then swapped
        assert not swapped[:half].any() and swapped[half:].all()
    seen = [(r, bool(s)) for rows, swapped in micro for r, s in zip(rows, swapped)]
    assert len(seen) == len(set(seen))  # no row shown twice in one orientation within the epoch
    again = train.Stream(lengths, cfg, world_size=1)
    assert [m[0] for s in range(again.total_steps) for m in again.step(s)] == [m[0] for m in micro]
    with pytest.raises(ValueError, match="even batch_size"):
        TrainConfig(batch_size=5, swap_pairs=True)
