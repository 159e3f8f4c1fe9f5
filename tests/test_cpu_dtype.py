"""The CPU dtype policy: fp32 unless the CPU computes bf16 natively and no slower; an explicit dtype or
``$LMSYS_CPU_DTYPE`` always wins; every stage that runs a model on a CPU (GPTQ calibration, the quantised
kernel, the fidelity report, inference) follows it, and the quantised folder keeps the source's dtype."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from lmsys_lib import inference, modeling, quantize
from lmsys_lib.config import PackConfig, QuantizeConfig

PACK = PackConfig(max_length=128)
CFG = QuantizeConfig(bits=8, group_size=32, calib_rows=16, calib_max_length=128)


def _probe(native, fp32=100.0, bf16=1.0):
    flags = ["avx512_bf16"] if native else []
    return lambda: {"capability": "AVX512" if native else "AVX2", "bf16_flags": flags, "native_bf16": native,
                    "gflops": {"fp32": fp32, "bf16": bf16, "fp16": bf16}}


@pytest.fixture
def policy(monkeypatch):
    """Set the probe's answer (and clear the once-per-process decision around the test)."""
    monkeypatch.delenv(modeling.CPU_DTYPE_ENV, raising=False)
    modeling.cpu_dtype_choice.cache_clear()

    def use(probe):
        monkeypatch.setattr(modeling, "cpu_probe", probe)
        modeling.cpu_dtype_choice.cache_clear()

    yield use
    modeling.cpu_dtype_choice.cache_clear()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert "avx512_bf16" in modeling.cpu_flags(x86) and "avx2" in modeling.cpu_flags(x86)
    assert "bf16" in modeling.cpu_flags(arm)
    assert modeling.cpu_flags(tmp_path / "absent") is None


@pytest.mark.parametrize(("native", "fp32", "bf16", "want"), [
    (False, 100.0, 1.2, "fp32"),     # AVX2-only: bf16 runs through a slow fallback
    (False, 100.0, 300.0, "fp32"),   # no native flag: never bf16, whatever one timing said
    (True, 100.0, 400.0, "bf16"),    # AMX / AVX-512 BF16 and measured faster
    (True, 100.0, 60.0, "fp32"),     # native but measured slower here
    (None, 100.0, 400.0, "bf16"),    # flags unreadable: the measurement decides
    (None, 100.0, 1.0, "fp32"),
])
def test_policy_follows_flags_and_measurement(policy, native, fp32, bf16, want):
    policy(_probe(native, fp32, bf16))
    said = []
    assert modeling.cpu_dtype(said.append) == modeling._dtype(want)
    assert modeling.compute_dtype("cpu", log=said.append) == modeling._dtype(want)
    assert said[0].startswith(f"CPU compute dtype: {want} — ") and "GFLOP/s" in said[0]
    assert modeling.dtype_for("cpu") == torch.float32  # training keeps fp32 weights on any CPU


def test_explicit_and_environment_dtypes_win(policy, monkeypatch):
    policy(_probe(False))
    assert modeling.compute_dtype("cpu", "bf16") == torch.bfloat16
    assert modeling.compute_dtype("cpu", "fp16") == torch.float16
    monkeypatch.setenv(modeling.CPU_DTYPE_ENV, "bf16")
    modeling.cpu_dtype_choice.cache_clear()
    said = []
    assert modeling.cpu_dtype(said.append) == torch.bfloat16 and "forced by $LMSYS_CPU_DTYPE" in said[0]
    monkeypatch.setenv(modeling.CPU_DTYPE_ENV, "fp8")
    modeling.cpu_dtype_choice.cache_clear()
    with pytest.raises(ValueError, match=r"LMSYS_CPU_DTYPE='fp8': expected one of"):
        modeling.cpu_dtype()


def test_the_real_probe_measures_every_dtype(policy):
    policy(modeling.cpu_probe)  # the real probe, without $LMSYS_CPU_DTYPE
    probe = modeling.cpu_probe()
    assert set(probe["gflops"]) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in probe["gflops"].values())
    name, reason = modeling.cpu_dtype_choice()
    assert name in ("fp32", "bf16") and probe["capability"] in reason
    if probe["native_bf16"] is False:
        assert name == "fp32"


def _classifier(tokenizer, out, dtype):
    from transformers import AutoModelForSequenceClassification

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), out / "base")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(out / "cls")
    modeling.load_tokenizer(base).save_pretrained(out / "cls")
    return out / "cls"


def test_no_native_bf16_means_fp32_in_every_stage(policy, tmp_path, tokenizer, synth_frame):
    """A bf16 merged checkpoint on an AVX2-only CPU: calibrated, loaded, compared and served in fp32; the
    weights GPTQ leaves unquantised go back to disk in bf16, bit for bit."""
    from safetensors.torch import load_file

    policy(_probe(False, 100.0, 300.0))
    cls = _classifier(tokenizer, tmp_path, torch.bfloat16)
    ids, summary = quantize.calibration_set(synth_frame.iloc[:200], modeling.load_tokenizer(cls), CFG, PACK)
    said = []
    qdir = quantize.quantize(cls, tmp_path / "q", ids, CFG, device="cpu", calib_summary=summary, log=said.append)
    side = json.loads((qdir / quantize.SIDECAR).read_text())
    assert side["dtype"] == "float32" and side["source_dtype"] == "bfloat16"
    assert any(line.startswith("CPU compute dtype: fp32 — ") for line in said)
    assert any("calibration rows on cpu in float32" in line for line in said)
    stored, source = load_file(qdir / "model.safetensors"), load_file(cls / "model.safetensors")
    for key in ("score.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert stored[key].dtype == torch.bfloat16 and torch.equal(stored[key], source[key])

    model, _, info = quantize.load_quantized(qdir, "cpu", log=said.append)
    assert model.dtype == torch.float32 and info["dtype"] == "float32" and info["kernel"] == "gptq_torch"
    assert not any("dequantize_weight" in vars(m) for m in model.modules())  # eager dequantiser on a CPU
    from transformers import AutoModelForSequenceClassification

    compiled = AutoModelForSequenceClassification.from_pretrained(qdir, dtype=torch.float32).eval()
    assert any("dequantize_weight" in vars(m) for m in compiled.modules())
    batch = {"input_ids": torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, compiled(**batch).logits, atol=1e-6)
    report = quantize.fidelity_report(cls, qdir, synth_frame.iloc[600:640], PACK, CFG, device="cpu",
                                      log=said.append)
    assert report["dtype"] == "float32" and report["kl_mean"] < 1e-3
    models, _, info = inference.load_models(cls, [torch.device("cpu")], log=said.append)
    assert models[0].dtype == torch.float32 and info["dtype"] == "float32"


def test_a_forced_dtype_still_quantises_and_reports_in_it(policy, tmp_path, tokenizer, synth_frame):
    policy(_probe(False))
    cls = _classifier(tokenizer, tmp_path, torch.float32)
    ids, _ = quantize.calibration_set(synth_frame.iloc[:200], modeling.load_tokenizer(cls), CFG, PACK)
    cfg = dataclasses.replace(CFG, dtype="bf16")
    qdir = quantize.quantize(cls, tmp_path / "q", ids, cfg, device="cpu", log=lambda _: None)
    assert json.loads((qdir / quantize.SIDECAR).read_text())["dtype"] == "bfloat16"
    model, _, info = quantize.load_quantized(qdir, "cpu", dtype="bf16", log=lambda _: None)
    assert model.dtype == torch.bfloat16 and info["dtype"] == "bfloat16"
    report = quantize.fidelity_report(cls, qdir, synth_frame.iloc[600:620], PACK, cfg, device="cpu",
                                      log=lambda _: None, dtype="bf16")
    assert report["dtype"] == "bfloat16"
    assert quantize.tensor_shapes(qdir)["score.weight"][1] == "BF16"  # a 16-bit calibration stores its own dtype


def test_the_quantize_stage_checks_fidelity_in_the_forced_dtype(policy, tmp_path, tokenizer, synth_dir):
    policy(_probe(False))
    cls = _classifier(tokenizer, tmp_path, torch.float32)
    cfg = dataclasses.replace(CFG, dtype="bf16", min_agreement=0.0)
    report = quantize.run(cls, tmp_path / "q", synth_dir / "train.csv", synth_dir / "train.csv", PACK, cfg,
                          device="cpu", fraction=0.05, log=lambda _: None)
    assert report["dtype"] == "bfloat16"
