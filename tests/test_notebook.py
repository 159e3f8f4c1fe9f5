"""notebook.py: stage timing and its messages, the dry-run flag, progress bars, the device-map check on a real
tiny model offloaded to CPU and disk, and the planner's arithmetic against hand counts and its calibration."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from lmsys_lib import notebook as nb

# -- format_duration, stage, progress --------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0.0 s"), (4.21, "4.2 s"), (59.94, "59.9 s"), (59.96, "1 min 00 s"), (185, "3 min 05 s"),
    (3599.4, "59 min 59 s"), (3599.6, "1 h 00 min"), (7620, "2 h 07 min"), (93_600, "26 h 00 min"),
])
def test_format_duration(seconds, text):
    assert nb.format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_format_duration_refuses_what_is_not_a_duration(bad):
    with pytest.raises(ValueError, match="finite number of seconds"):
        nb.format_duration(bad)


@pytest.fixture
def beeps(monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(nb, "beep", lambda ok=True, seconds=0.3: calls.append(ok) or True)
    return calls


def test_stage_prints_start_and_done_and_beeps_ok(capsys, beeps):
    with nb.stage("pack") as timer:
        assert timer.name == "pack" and timer.seconds == 0.0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[pack] started"
    assert out[1].startswith("[pack] done in ") and out[1].endswith(" s")
    assert timer.seconds > 0
    assert beeps == [True]


def test_stage_prints_failed_beeps_low_and_reraises(capsys, beeps):
    with pytest.raises(KeyError, match="fold 3"), nb.stage("train") as timer:
        raise KeyError("fold 3")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[train] started"
    assert out[1].startswith("[train] FAILED after ") and out[1].endswith(": KeyError: 'fold 3'")
    assert timer.seconds > 0
    assert beeps == [False]


def test_stage_can_stay_quiet(capsys, beeps):
    with pytest.raises(ValueError), nb.stage("x", beep_on_end=False):
        raise ValueError
    assert capsys.readouterr().out.splitlines()[1].endswith(": ValueError")  # no message: the type alone
    with nb.stage("y", beep_on_end=False):
        pass
    assert beeps == []


def test_progress_iterates_and_shows_an_eta():
    bar = nb.progress(range(5), desc="rows", unit="row", disable=False)
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.total == 5 and bar.unit == "row" and bar.desc == "rows"
    manual = nb.progress(total=10, disable=False)
    manual.update(4)
    assert "4/10" in str(manual) and "<" in str(manual)  # elapsed<remaining
    manual.close()
    assert nb.progress(range(3), disable=True).disable


# -- dry_run ---------------------------------------------------------------------------------------


@pytest.fixture
def frame() -> pd.DataFrame:
    index = pd.Index(range(1000)).to_series().sample(frac=1.0, random_state=1).to_numpy()  # shuffled ids
    return pd.DataFrame({"id": index, "pos": range(1000)}, index=index)


def test_dry_run_full_fraction_is_the_same_frame(frame, capsys):
    assert nb.dry_run(frame, 1.0) is frame
    assert capsys.readouterr().out == ""


def test_dry_run_share_is_seeded_and_keeps_the_original_order(frame, capsys):
    part = nb.dry_run(frame, 0.1, seed=3)
    assert capsys.readouterr().out == "dry run: 100 of 1000 rows (fraction 0.1)\n"
    assert len(part) == 100 and part["pos"].is_monotonic_increasing  # original order and index
    assert (frame.loc[part.index, "pos"] == part["pos"]).all()
    assert part.equals(nb.dry_run(frame, 0.1, seed=3))
    assert not part.equals(nb.dry_run(frame, 0.1, seed=4))


def test_dry_run_keeps_at_least_one_row(frame, capsys):
    assert len(nb.dry_run(frame.head(50), 0.001, what="conversations")) == 1
    assert capsys.readouterr().out == "dry run: 1 of 50 conversations (fraction 0.001)\n"


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_dry_run_refuses_a_fraction_outside_0_1(frame, fraction):
    with pytest.raises(ValueError, match=f"got {fraction!r}"):
        nb.dry_run(frame, fraction)


# -- check_device_map on a real tiny Llama ---------------------------------------------------------

DISK_LAYERS = ("model.layers.1", "model.layers.2")


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny Llama in memory, and the same checkpoint loaded with two layers offloaded to disk and the
    rest on cpu. transformers accepts this map without a GPU: disk-mapped parameters load on ``meta`` and
    accelerate's hooks read them from the checkpoint for each forward."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = _tiny_llama()
    folder = tmp_path_factory.mktemp("tiny_llama")
    plain.save_pretrained(folder)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map,
                                                     offload_folder=folder / "offload").eval()
    return plain, offloaded


def _hand_count(model, prefixes):
    params = [p for name, p in model.named_parameters() if name.startswith(tuple(f"{k}." for k in prefixes))]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def test_the_offload_map_is_real(models):
    import torch

    plain, offloaded = models
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # disk layers are not in memory
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, plain(ids).logits)


def test_disk_share_matches_a_hand_count(models):
    plain, offloaded = models
    disk_params, disk_bytes = _hand_count(plain, DISK_LAYERS)
    total_params = sum(p.numel() for p in plain.parameters())
    total_bytes = sum(t.numel() * t.element_size() for t in [*plain.parameters(), *plain.buffers()])
    report = nb.check_device_map(offloaded, expect_accelerator=False, warn=False)
    assert report["devices"]["disk"] == {"params": disk_params, "bytes": disk_bytes}
    assert report["devices"]["cpu"]["params"] == total_params - disk_params
    assert set(report["devices"]) == {"cpu", "disk"}
    # no accelerator: the CPU is the main device, only disk counts as offloaded
    assert report["offloaded_params"] == disk_params and report["offloaded_bytes"] == disk_bytes
    assert report["offloaded_share"] == pytest.approx(disk_bytes / total_bytes)
    assert report["ok"] is False


def test_offload_warns_loudly_when_a_gpu_is_expected(models, capsys):
    plain, offloaded = models
    disk_params, _ = _hand_count(plain, DISK_LAYERS)
    cpu_params = sum(p.numel() for p in plain.parameters()) - disk_params
    with pytest.warns(nb.OffloadWarning, match="~10x slower") as caught:
        report = nb.check_device_map(offloaded, expect_accelerator=True)
    message = str(caught[0].message)
    assert f"cpu : {cpu_params:,} params" in message and f"disk: {disk_params:,} params" in message
    assert "GiB" in message and "quantise to 8 or 4 bits" in message and "max_memory" in message
    box = capsys.readouterr().out
    assert box.startswith("+---") and box.rstrip().endswith("-+") and f"{disk_params:,}" in box
    assert report["offloaded_params"] == cpu_params + disk_params and report["offloaded_share"] == 1.0
    assert issubclass(nb.OffloadWarning, RuntimeWarning)


def test_an_all_cpu_model_without_accelerator_is_ok_and_silent(models, capsys):
    plain, _ = models
    with warnings.catch_warnings():
        warnings.simplefilter("error", nb.OffloadWarning)
        report = nb.check_device_map(plain, expect_accelerator=False)
    assert report["ok"] and report["offloaded_params"] == 0 and report["offloaded_share"] == 0.0
    assert list(report["devices"]) == ["cpu"]
    assert report["devices"]["cpu"]["params"] == sum(p.numel() for p in plain.parameters())
    assert capsys.readouterr().out == ""


def test_a_gpu_index_in_the_map_means_an_accelerator_is_expected():
    model = _tiny_llama()  # a map as accelerate writes it for a GPU machine; no dispatch needed to read it
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0, "model.rotary_emb": 0,
                           "lm_head": "cpu"}
    with pytest.warns(nb.OffloadWarning, match="cpu"):
        report = nb.check_device_map(model)
    lm_head = model.lm_head.weight.numel()
    assert report["devices"]["cpu"]["params"] == lm_head == report["offloaded_params"]
    assert report["devices"]["cuda:0"]["params"] == sum(p.numel() for p in model.parameters()) - lm_head


# -- planner ---------------------------------------------------------------------------------------


def test_training_flops_by_hand():
    # LoRA + checkpointing: forward 2N + recompute 2N + input-gradient backward 2N = 6N per token
    p = nb.plan("student", 1.0, 1000, 2048, "a100-80g", mean_tokens=500)
    assert p.flops == pytest.approx(6 * 1e9 * 1000 * 500)
    assert p.wall_hours == pytest.approx(3e15 / (312e12 * 0.35) / 3600)
    full = nb.plan("student", 1.0, 1000, 2048, "a100-80g", mean_tokens=500, lora=False)
    assert full.flops == pytest.approx(8 * 1e9 * 1000 * 500)  # + weight gradients 2N
    # 5 folds: 5 × 4/5 = 4 × the rows trained, then every row scored once out of fold, twice with TTA
    folds = nb.plan("student", 1.0, 1000, 2048, "a100-80g", mean_tokens=500, folds=5, epochs=2)
    assert folds.flops == pytest.approx(6e9 * 1000 * 2 * 4 * 500 + 2e9 * 1000 * 500 * 2)
    assert folds.tokens == pytest.approx(1000 * 2 * 4 * 500 + 1000 * 500 * 2)


def test_inference_reproduces_the_kaggle_calibration():
    no_tta = nb.plan("inference", "gemma2-9b", 25_000, 2048, "kaggle-2xt4", tta=False)
    assert no_tta.mean_tokens == 655
    assert no_tta.flops == pytest.approx(2 * 9.24e9 * 25_000 * 655)
    assert no_tta.wall_hours == pytest.approx(4.0, abs=0.05)
    assert nb.plan("inference", "gemma2-9b", 25_000, 2048, "kaggle-2xt4").wall_hours == pytest.approx(8.0, abs=0.1)
    assert no_tta.cost_usd == 0 and no_tta.quota_weeks == pytest.approx(4.0 / 30, abs=0.01)
    assert no_tta.gpu_hours == pytest.approx(2 * no_tta.wall_hours)
    assert "4 h" in str(no_tta) and "assumptions:" in str(no_tta) and "MFU 0.162" in str(no_tta)


def test_doubling_rows_doubles_hours():
    for stage in ("teacher", "student", "inference", "quantize"):
        one = nb.plan(stage, "llama3-8b", 10_000, 1024, "h100-80g", folds=3 if stage != "inference" else 1)
        two = nb.plan(stage, "llama3-8b", 20_000, 1024, "h100-80g", folds=3 if stage != "inference" else 1)
        assert two.wall_hours == pytest.approx(2 * one.wall_hours, rel=1e-6 if stage != "quantize" else 1e-3)


def test_price_and_mfu_overrides():
    base = nb.plan("inference", "gemma2-9b", 25_000, 2048, "a100-80g")
    assert base.cost_usd == pytest.approx(1.6 * base.wall_hours)
    assert nb.plan("inference", "gemma2-9b", 25_000, 2048, "a100-80g",
                   price_per_hour=3.2).cost_usd == pytest.approx(2 * base.cost_usd)
    slower = nb.plan("inference", "gemma2-9b", 25_000, 2048, "a100-80g", mfu=0.15)
    assert slower.wall_hours == pytest.approx(2 * base.wall_hours) and slower.mfu == pytest.approx(0.15)
    assert "MFU inference 0.150 (given)" in slower.assumptions


@pytest.mark.parametrize(("args", "match"), [
    (("pretrain", "gemma2-9b", 10, 10, "a100-80g"), "unknown stage 'pretrain'; valid: teacher, student"),
    (("student", "gemma2-9b", 10, 10, "tpu-v5"), "unknown hardware 'tpu-v5'; valid: kaggle-2xt4, colab-t4"),
    (("student", "gemma-7b", 10, 10, "a100-80g"), "unknown model name 'gemma-7b'; valid: gemma2-9b"),
    (("student", -1.0, 10, 10, "a100-80g"), "model_size must be > 0"),
    (("student", 9.0, 0, 10, "a100-80g"), "rows and max_length must be >= 1"),
])
def test_bad_names_and_numbers_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        nb.plan(*args)


def test_memory_verdicts():
    teacher = nb.plan("teacher", "llama3-70b", 57_477, 2048, "kaggle-2xt4", folds=5)
    assert not teacher.fits_memory and "does not fit 2 × 15 GiB" in teacher.memory_note
    assert "12 h Kaggle session" in teacher.note
    fp16 = nb.plan("inference", "gemma2-9b", 25_000, 2048, "kaggle-2xt4")
    assert fp16.fits_memory and "does not fit one T4" in fp16.memory_note and "8-bit" in fp16.memory_note
    int8 = nb.plan("inference", "gemma2-9b", 25_000, 2048, "kaggle-2xt4", weight_bits=8)
    assert int8.fits_memory and int8.memory_gib < 15
    assert nb.plan("teacher", "llama3-70b", 1000, 2048, "a100-80g").fits_memory  # QLoRA on one 80 GB
    with pytest.raises(ValueError, match="full fine-tuning needs 16-bit"):
        nb.plan("student", 9.0, 10, 10, "a100-80g", lora=False, weight_bits=4)


def test_merge_is_io_bound_and_free_of_quota():
    p = nb.plan("merge", "gemma2-9b", 1, 2048, "kaggle-2xt4", folds=5)
    assert p.mfu is None and p.gpu_hours == 0 and p.quota_weeks == 0 and p.fits_memory
    assert p.wall_hours == pytest.approx(4 * 9.24e9 / 0.5e9 / 3600)  # read 2 B + write 2 B per param


def test_default_mean_tokens_follows_the_measurements():
    assert [nb.default_mean_tokens(n) for n in (1024, 2048, 4096)] == [568, 655, 689]
    lengths = [128, 512, 1024, 1500, 2048, 3000, 4096, 6000, 8192, 32_768]
    means = [nb.default_mean_tokens(n) for n in lengths]
    assert means == sorted(means) and means[-1] == 703
    assert all(m <= n for m, n in zip(means, lengths))


def test_plan_all_has_one_row_per_hardware():
    table = nb.plan_all("inference", "gemma2-9b", 25_000, 2048, tta=False)
    assert list(table.index) == list(nb.HARDWARE)
    assert table.loc["kaggle-2xt4", "wall_hours"] == pytest.approx(4.0, abs=0.05)
    assert table.loc["h100-80g", "wall_hours"] < table.loc["a100-80g", "wall_hours"]
    assert table["quota_weeks"].isna().sum() == len(nb.HARDWARE) - 1  # Kaggle only
    two = nb.plan_all("student", 9.24, 1000, 1024, hardware=["rtx4090", "colab-t4"])
    assert list(two.index) == ["rtx4090", "colab-t4"]
