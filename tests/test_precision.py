"""Mixed precision: fp32 master weights under bf16 / fp16 autocast, fp16 loss scaling, resume with the scaler;
gradient checkpointing enabled once, non-reentrant; RNG states in checkpoints."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmsys_lib import modeling, train
from lmsys_lib.config import ModelConfig, TrainConfig


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    return modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer),
                                         tmp_path_factory.mktemp("prec") / "tiny-llama")


def _data(n: int, seed: int, vocab: int = 1400) -> train.TrainData:
    """Random rows whose label is told by their first token (learnable, and fast on a CPU)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    ids = [np.concatenate([[10 + int(y)], rng.integers(20, vocab, size=int(rng.integers(12, 30)))]) for y in labels]
    return train.TrainData(np.arange(n), ids, [x[::-1].copy() for x in ids], labels.astype(np.int64))


def _model_cfg(path, dtype: str, **kw) -> ModelConfig:
    return ModelConfig(model_dir=str(path), lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype=dtype,
                       head_init="model", **kw)


def _head(weights: dict) -> torch.Tensor:
    (key,) = [k for k in weights if ".score." in k and k.endswith(".weight")]  # model or saved adapter
    return weights[key].float()


def test_bf16_base_keeps_fp32_masters_and_every_head_weight_moves_at_lr_1e5(tiny_llama, tmp_path, monkeypatch):
    """A bf16-stored head updated in place at lr 1e-5 keeps most of its weights (an update below half a bf16
    ulp of a 0.02-sized weight rounds away); the fp32 master moves every one of them."""
    cfg = _model_cfg(tiny_llama, "bf16")
    torch.manual_seed(0)
    model, _ = modeling.load_classifier(cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    start = _head({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    tcfg = TrainConfig(max_steps=20, batch_size=8, grad_accum=1, lr=1e-5, warmup_ratio=0.0, min_lr_ratio=1.0,
                       eval_every=0, checkpoint_every=0, swap_prob=0.0, seed=0)
    metrics = train.fit(cfg, tcfg, _data(160, 1), _data(24, 2), tmp_path / "fold", progress=False)
    end = _head(load_file(tmp_path / "fold" / "adapter" / "adapter_model.safetensors"))
    assert metrics["compute_dtype"] == "bfloat16" and metrics["skipped_steps"] == 0
    moved = (end != start).float().mean().item()
    assert moved == 1.0, f"only {moved:.0%} of the head's weights moved"
    # the same 20 steps with the trainable tensors left in bf16 (the masters switched off): most never move
    monkeypatch.setattr(modeling, "upcast_trainable", lambda model: [])
    train.fit(cfg, tcfg, _data(160, 1), _data(24, 2), tmp_path / "bf16-masters", progress=False)
    naive = _head(load_file(tmp_path / "bf16-masters" / "adapter" / "adapter_model.safetensors"))
    assert (naive != start).float().mean().item() < 0.5


def test_fp16_autocast_with_loss_scaling_trains_50_steps_finite_and_counts_skips(tiny_llama, tmp_path, monkeypatch):
    cfg = _model_cfg(tiny_llama, "fp16")
    tcfg = TrainConfig(max_steps=50, batch_size=8, grad_accum=1, lr=1e-3, eval_every=25, checkpoint_every=0,
                       seed=0)
    metrics = train.fit(cfg, tcfg, _data(400, 3), _data(48, 4), tmp_path / "fold", progress=False)
    assert metrics["compute_dtype"] == "float16" and metrics["steps"] == 50
    assert isinstance(metrics["skipped_steps"], int) and metrics["skipped_steps"] < 25  # counted: see below
    assert metrics["loss_scale"] is not None and metrics["loss_scale"] > 0
    assert all(np.isfinite([h["train_loss"], h["eval_log_loss"]]).all() for h in metrics["history"])
    weights = load_file(tmp_path / "fold" / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    # the same run with fp16 masters and no loss scaling goes NaN before its first evaluation
    monkeypatch.setattr(modeling, "upcast_trainable", lambda model: [])
    monkeypatch.setattr(train.Precision, "for_device", classmethod(lambda cls, device, compute: cls(device, compute)))
    with pytest.raises(ValueError, match="finite"):
        train.fit(cfg, tcfg, _data(400, 3), _data(48, 4), tmp_path / "unscaled", progress=False)


def test_an_overflowing_fp16_step_is_skipped_counted_and_the_scale_halved():
    """The loop's step through the scaler: gradients that overflow fp16 leave the weights as they were."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    precision = train.Precision.for_device("cpu", torch.float16)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # any gradient overflows at this scale
    before = layer.weight.detach().clone()
    with precision.autocast():
        loss = layer(torch.randn(4, 8)).float().sum()
    precision.scale(loss).backward()
    precision.scaler.unscale_(opt)
    assert precision.step(opt) is True and torch.equal(layer.weight, before)
    assert precision.scaler.get_scale() == 2.0 ** 99
    with precision.autocast():
        loss = layer(torch.randn(4, 8)).float().sum()
    opt.zero_grad()
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    precision.scale(loss).backward()
    precision.scaler.unscale_(opt)
    assert precision.step(opt) is False and not torch.equal(layer.weight, before)


def test_fp16_resume_restores_the_scaler_and_ends_bit_identical(tiny_llama, tmp_path):
    cfg = _model_cfg(tiny_llama, "fp16")
    tcfg = TrainConfig(max_steps=12, batch_size=8, grad_accum=1, lr=1e-3, eval_every=0, checkpoint_every=6,
                       seed=0)
    data, held = _data(200, 5), _data(16, 6)
    whole = train.fit(cfg, tcfg, data, held, tmp_path / "whole", progress=False)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "whole" / "fit_config.json", resumed_dir)
    shutil.copytree(tmp_path / "whole" / "checkpoints", resumed_dir / "checkpoints")  # as killed after step 6
    saved = json.loads((resumed_dir / "checkpoints" / "step-000006" / "state.json").read_text())
    assert saved["scaler"]["scale"] > 0 and "_growth_tracker" in saved["scaler"]
    again = train.fit(cfg, tcfg, data, held, resumed_dir, progress=False)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["loss_scale"] == whole["loss_scale"] and again["skipped_steps"] == whole["skipped_steps"]


def _checkpointing_calls(model) -> list:
    return [m._gradient_checkpointing_func for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_gradient_checkpointing_is_enabled_once_and_non_reentrant(tiny_llama, quantization, monkeypatch):
    from transformers import PreTrainedModel

    enabled = []
    real = PreTrainedModel.gradient_checkpointing_enable

    def counted(self, gradient_checkpointing_kwargs=None, **kwargs):  # the real method (same signature), counted
        enabled.append(gradient_checkpointing_kwargs)
        return real(self, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", counted)
    cfg = _model_cfg(tiny_llama, "auto", gradient_checkpointing=True, quantization=quantization)
    model, _ = modeling.load_classifier(cfg)
    calls = _checkpointing_calls(model)
    assert calls and all(c.keywords.get("use_reentrant") is False for c in calls)
    assert enabled == [{"use_reentrant": False}]  # once


def test_qlora_keeps_frozen_16_bit_tensors_in_the_compute_dtype(tiny_llama):
    """prepare_model_for_kbit_training upcasts embeddings and norms to fp32; under autocast they go back."""
    model, _ = modeling.load_classifier(_model_cfg(tiny_llama, "bf16", quantization="nf4"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and type(p).__name__ != "Params4bit"}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_predict_logits_of_no_rows_is_empty():
    from accelerate import Accelerator

    assert train.predict_logits(Accelerator(cpu=True), None, [], 0, 8).shape == (0, 3)


def test_rng_states_round_trip_on_the_cpu():
    states = train.rng_states("cpu")
    assert set(states) == {"rng"}  # a CUDA process adds "cuda_rng"
    first = torch.rand(3)
    train.restore_rng(states, "cpu")
    assert torch.equal(torch.rand(3), first)


def test_autocast_is_a_no_op_in_fp32_and_real_in_16_bit():
    x = torch.randn(4, 4)
    with modeling.autocast("cpu", torch.float32):
        assert (x @ x).dtype == torch.float32
    with modeling.autocast("cpu", torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


# -- the shipped multi-GPU configs, launched as users launch them, on 2 CPU processes ----------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launch_run(tmp_path_factory, tokenizer):
    from tests.conftest import tiny_run

    return tiny_run(tmp_path_factory.mktemp("launch"), tokenizer, 200, 2, 8)


def _launch(run: Path, tmp_path: Path, accelerate_args: list[str], name: str, model: dict,
            train: dict | None = None) -> subprocess.CompletedProcess:
    cfg = {"name": name, "model": {"model_dir": str(run / "models" / "tiny-llama"), "lora_r": 4, "lora_alpha": 8,
                                   "head_init": "model", "lora_dropout": 0.0} | model,
           "train": {"max_steps": 4, "batch_size": 4, "global_batch": 8, "eval_every": 0, "checkpoint_every": 2,
                     "lr": 1e-3} | (train or {}),
           "pack": {"max_length": 96}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    command = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, "-m", "lmsys_lib", "teacher",
               "--run-dir", str(run), "--config", str(path), "--folds", "0", "--name", name]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ | {"ACCELERATE_USE_CPU": "1"},
                          timeout=600)


@pytest.mark.parametrize(("config", "model"), [
    ("2xT4.yaml", {"dtype": "fp16"}),  # what a T4 computes in: fp16 autocast + loss scaling
    ("8xA100-ddp-qlora.yaml", {"dtype": "bf16", "quantization": "nf4"}),  # 4-bit copies, bf16 autocast
])
def test_shipped_ddp_configs_train_on_two_processes(launch_run, tmp_path, config, model):
    """The shipped files as given, with the process count cut to 2 CPU processes over gloo."""
    name = config.split(".")[0].lower()
    proc = _launch(launch_run, tmp_path, ["--config_file", str(ROOT / "configs" / "accelerate" / config),
                                          "--num_processes", "2"], name, model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((launch_run / "teachers" / name / "fold0" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(set(metrics["rank_checksums"])) == 1
    assert metrics["compute_dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[model["dtype"]]
    assert np.isfinite(metrics["best_eval_log_loss"])
    assert (metrics["loss_scale"] is not None) == (model["dtype"] == "fp16")


def test_fsdp_on_one_process_and_accelerates_mixed_precision_are_refused(launch_run, tmp_path):
    one = _launch(launch_run, tmp_path, ["--num_processes", "1"], "one", {}, train={"fsdp": True})
    assert one.returncode != 0 and "one process has nothing to shard over" in one.stderr
    doubled = _launch(launch_run, tmp_path, ["--num_processes", "1", "--mixed_precision", "bf16"], "amp", {})
    assert doubled.returncode != 0 and "mixed_precision is 'bf16'" in doubled.stderr


def test_accelerates_fsdp_plugin_is_refused_before_any_model_loads(launch_run, tmp_path):
    proc = _launch(launch_run, tmp_path, ["--use_fsdp", "--num_processes", "2", "--mixed_precision", "no"],
                   "plugin", {})
    assert proc.returncode != 0 and "FSDP plugin is not supported" in proc.stderr and "train.fsdp" in proc.stderr
    assert not (launch_run / "teachers" / "plugin" / "fold0" / "metrics.json").exists()


def _adapter(run: Path, name: str) -> dict:
    folder = run / "teachers" / name / "fold0" / "adapter"
    return load_file(next(f for f in (folder / "adapter_model.safetensors", folder / "model.safetensors") if f.exists()))


FULL = {"lora_r": 0, "gradient_checkpointing": True}  # what FSDP is for: every weight an fp32 master


def test_fsdp_on_two_processes_matches_one_process_and_resumes_exactly(launch_run, tmp_path):
    """FSDP2 (train.fsdp) over 2 CPU processes, full fine-tuning with gradient checkpointing, trains what 1
    unsharded process trains (same global batch); killed after its first checkpoint and resumed, it ends
    bit-identical to its uninterrupted run."""
    cpu2 = ["--config_file", str(ROOT / "configs" / "accelerate" / "cpu2.yaml")]
    fsdp = {"fsdp": True}
    proc = _launch(launch_run, tmp_path, cpu2, "fsdp", FULL, train=fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((launch_run / "teachers" / "fsdp" / "fold0" / "metrics.json").read_text())
    assert metrics["fsdp"] and metrics["processes"] == 2 and metrics["rank_checksums"] == []
    single = _launch(launch_run, tmp_path, ["--num_processes", "1"], "single", FULL)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _adapter(launch_run, "fsdp"), _adapter(launch_run, "single")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the same run, as killed after step 2: only its first checkpoint (each process's shards) survives
    killed = tmp_path / "killed"
    shutil.copytree(launch_run / "data", killed / "data")
    fold, copied = launch_run / "teachers" / "fsdp" / "fold0", killed / "teachers" / "fsdp" / "fold0"
    shutil.copytree(fold / "checkpoints" / "step-000002", copied / "checkpoints" / "step-000002")
    shutil.copy(fold / "fit_config.json", copied)
    assert {p.name for p in (fold / "checkpoints" / "step-000002").glob("*-rank*.safetensors")} >= {
        "trainable-rank0.safetensors", "trainable-rank1.safetensors", "optimizer-rank0.safetensors"}
    again = _launch(killed, tmp_path, cpu2, "fsdp", FULL | {"model_dir": str(launch_run / "models" / "tiny-llama")},
                    train=fsdp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    c = _adapter(killed, "fsdp")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_swap_pairs_train_and_resume_deterministically(tiny_llama, tmp_path):
    cfg = _model_cfg(tiny_llama, "auto")
    tcfg = TrainConfig(max_steps=4, batch_size=4, grad_accum=1, swap_pairs=True, eval_every=0, checkpoint_every=2,
                       lr=1e-3, seed=0)
    data, held = _data(64, 7), _data(8, 8)
    train.fit(cfg, tcfg, data, held, tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "fit_config.json", tmp_path / "b")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002", tmp_path / "b" / "checkpoints" / "step-000002")
    train.fit(cfg, tcfg, data, held, tmp_path / "b", progress=False)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
