"""GPTQ of tiny real-architecture classifiers on CPU: quantise, save, reload with plain from_pretrained,
fidelity against the unquantised model, the 16-bit head, and clear errors for broken folders."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsys_lib import modeling, quantize
from lmsys_lib.config import PackConfig, QuantizeConfig, SynthConfig
from lmsys_lib.metrics import softmax
from lmsys_lib.prompting import Packer

PACK = PackConfig(max_length=256)
# group 32 divides the tiny models' widths (64, 128); 48 calibration rows keep a test quantisation ~5 s
CFG = QuantizeConfig(bits=8, group_size=32, calib_rows=48, calib_max_length=256)


def _classifier(family, tokenizer, out, head_std=0.5):
    """A tiny merged-style classifier checkpoint. The head is drawn with std 0.5 (logit std ≈ 5): with the
    default 0.02 every row would sit at ≈ uniform and any quantisation error would hide in a flat softmax."""
    from transformers import AutoModelForSequenceClassification

    base = modeling.save_tiny_checkpoint(family, copy.deepcopy(tokenizer), out / "base")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, head_std)
    model.save_pretrained(out / "cls")
    modeling.load_tokenizer(base).save_pretrained(out / "cls")
    return out / "cls"


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def quantised(request, tmp_path_factory, tokenizer, synth_frame):
    out = tmp_path_factory.mktemp(f"q-{request.param}")
    cls = _classifier(request.param, tokenizer, out)
    ids, summary = quantize.calibration_set(synth_frame.iloc[:400], modeling.load_tokenizer(cls), CFG, PACK)
    qdir = quantize.quantize(cls, out / "quantized", ids, CFG, device="cpu", calib_summary=summary,
                             log=lambda _: None)
    return request.param, cls, qdir


def test_calibration_rows_span_the_length_distribution(synth_frame, tokenizer):
    cfg = QuantizeConfig(calib_rows=20, calib_max_length=256)
    ids, summary = quantize.calibration_set(synth_frame, tokenizer, cfg, PACK)
    again, _ = quantize.calibration_set(synth_frame, tokenizer, cfg, PACK)
    assert ids == again and len(ids) == 20 and summary["of_rows"] == len(synth_frame)
    lengths = np.array([len(x) for x in ids])
    everything = summary["all_lengths"]
    assert lengths.max() >= everything["p75"] and lengths.min() <= everything["p25"]  # short and long rows
    assert lengths.max() <= 256
    other = quantize.calibration_set(synth_frame, tokenizer, dataclass_replace(cfg, calib_seed=1), PACK)[0]
    assert other != ids  # the seed picks other rows inside the same bins


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_quantised_checkpoint_reloads_with_plain_from_pretrained_and_is_faithful(quantised, synth_frame):
    from transformers import AutoModelForSequenceClassification

    family, cls, qdir = quantised
    config = json.loads((qdir / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 8 and config["quantization_config"].get("dataset") is None
    side = json.loads((qdir / quantize.SIDECAR).read_text())
    assert side["kernels"]["cpu"] == ["gptq_torch"] and side["kernels"]["cuda"][0] == "gptq_marlin"
    assert side["calibration"]["rows"] == 48 and side["source_dtype"] == "float32"
    held = synth_frame.iloc[600:800]  # never seen by the calibration
    tok = modeling.load_tokenizer(qdir)
    ids = list(Packer(tok, PACK).pack_frame(held)["input_ids"])
    plain = AutoModelForSequenceClassification.from_pretrained(qdir, dtype=torch.bfloat16)
    assert type(plain.score) is torch.nn.Linear  # the head is not quantised
    layer = plain.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("gptqmodel") and not isinstance(layer, torch.nn.Linear)
    ref = quantize.load_reference(cls, "cpu", torch.bfloat16)
    p = softmax(modeling.predict_logits(ref, ids, tok.pad_token_id))
    q = softmax(modeling.predict_logits(plain, ids, tok.pad_token_id))
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=1)
    assert kl.mean() <= 1e-3, (family, kl.mean())
    assert np.mean(p.argmax(1) == q.argmax(1)) >= 0.98
    assert p.max(1).mean() > 0.6  # the rows are far from uniform: the check has teeth

    report = quantize.fidelity_report(cls, qdir, held, PACK, CFG, device="cpu", log=lambda _: None)
    quantize.check_fidelity(report, CFG)
    assert report["kernel"] == "gptq_torch" and report["rows"] == 200
    assert report["bytes_quantized"] < report["bytes_reference"]
    assert report["kl_max"] >= report["kl_mean"] > 0 and report["max_abs_dlogit"] > 0
    assert np.isfinite([report["log_loss_reference"], report["log_loss_quantized"]]).all()
    table = quantize.report_table(report)
    assert list(table["model"]) == ["unquantised", "GPTQ (gptq_torch)"]
    json.dumps(quantize.saved_report(report))
    quantize.plot_kl(report)


def test_head_is_stored_unquantised_in_the_source_dtype(quantised):
    _, cls, qdir = quantised
    tensors, source = quantize.tensor_shapes(qdir), quantize.tensor_shapes(cls)
    assert tensors["score.weight"][1] == source["score.weight"][1]  # the tests' sources are fp32
    assert not any(k.startswith("score.") and k != "score.weight" for k in tensors)
    assert all(f"{m}.qweight" in tensors for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"))


def _copy(qdir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qdir, bad)
    return bad


def test_truncated_weights_are_named(quantised, tmp_path):
    bad = _copy(quantised[2], tmp_path)
    file = bad / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(quantize.QuantizedCheckpointError, match="model.safetensors.*truncated"):
        quantize.load_quantized(bad, log=lambda _: None)


def test_missing_files_and_config_are_named(quantised, tmp_path):
    bad = _copy(quantised[2], tmp_path)
    (bad / "model.safetensors").unlink()
    with pytest.raises(quantize.QuantizedCheckpointError, match="no model.safetensors"):
        quantize.validate_quantized(bad)
    (bad / "config.json").unlink()
    with pytest.raises(quantize.QuantizedCheckpointError, match="no config.json"):
        quantize.validate_quantized(bad)
    unquantised = _copy(quantised[1], tmp_path / "u")
    with pytest.raises(quantize.QuantizedCheckpointError, match="no GPTQ quantization_config"):
        quantize.load_quantized(unquantised, log=lambda _: None)


def test_a_missing_quantised_tensor_or_shard_is_named(quantised, tmp_path):
    bad = _copy(quantised[2], tmp_path)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(quantize.QuantizedCheckpointError, match=r"layers\.1\.mlp\.up_proj lacks \['scales'\]"):
        quantize.load_quantized(bad, log=lambda _: None)
    index = {"metadata": {}, "weight_map": {"score.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(quantize.QuantizedCheckpointError, match="shard.*missing"):
        quantize.validate_quantized(bad)


def test_fidelity_thresholds_fail_loudly():
    report = {"kl_mean": 2e-3, "kl_max": 0.5, "argmax_agreement": 0.9}
    with pytest.raises(quantize.FidelityError, match="mean KL 0.002 > max_mean_kl 0.001.*agreement 0.900"):
        quantize.check_fidelity(report, QuantizeConfig())
    with pytest.raises(quantize.FidelityError, match="max row KL"):
        quantize.check_fidelity({**report, "kl_mean": 0.0, "argmax_agreement": 1.0}, QuantizeConfig(max_row_kl=0.1))
    quantize.check_fidelity({"kl_mean": 1e-5, "kl_max": 1e-4, "argmax_agreement": 1.0}, QuantizeConfig())
    with pytest.raises(quantize.FidelityError, match="3 rows with non-finite logits.*mean KL nan"):  # NaN fails
        quantize.check_fidelity({"kl_mean": float("nan"), "kl_max": float("nan"), "argmax_agreement": 0.99,
                                 "non_finite_quantized": 3, "non_finite_reference": 0}, QuantizeConfig())


def test_bad_inputs_are_refused_before_any_work(quantised, tmp_path):
    family, cls, qdir = quantised
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        quantize.quantize(cls, tmp_path / "x", [[1, 2, 3]], QuantizeConfig(group_size=48), device="cpu")
    with pytest.raises(ValueError, match="already quantised"):
        quantize.quantize(qdir, tmp_path / "x", [[1, 2, 3]], CFG, device="cpu")
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizeConfig(bits=3)


def test_four_bit_quantises_too_and_strays_further(quantised, tmp_path, synth_frame):
    family, cls, qdir = quantised
    if family != "llama":
        pytest.skip("one architecture is enough for the 4-bit path")
    cfg4 = dataclass_replace(CFG, bits=4)
    ids, _ = quantize.calibration_set(synth_frame.iloc[:400], modeling.load_tokenizer(cls), cfg4, PACK)
    q4 = quantize.quantize(cls, tmp_path / "q4", ids, cfg4, device="cpu", log=lambda _: None)
    held = synth_frame.iloc[600:700]
    r8 = quantize.fidelity_report(cls, qdir, held, PACK, CFG, device="cpu", log=lambda _: None)
    r4 = quantize.fidelity_report(cls, q4, held, PACK, cfg4, device="cpu", log=lambda _: None)
    assert r4["bytes_quantized"] < r8["bytes_quantized"]
    assert r4["kl_mean"] > r8["kl_mean"]
    with pytest.raises(quantize.FidelityError):
        quantize.check_fidelity(r4, dataclass_replace(cfg4, max_mean_kl=r8["kl_mean"]))


def test_cli_quantizes_and_fails_loudly_on_a_missed_threshold(quantised, tmp_path, synth_dir, capsys):
    from lmsys_lib import cli, synthetic

    family, cls, _ = quantised
    if family != "llama":
        pytest.skip("the command is architecture-blind")
    frame = synthetic.generate(SynthConfig(n_train=60, n_test=5, seed=99))["train"]
    holdout = synthetic.write_table(frame, tmp_path / "holdout.csv")
    common = ["quantize", "--model", str(cls), "--data", str(synth_dir / "train.csv"), "--holdout", str(holdout),
              "--group-size", "32", "--calib-rows", "16", "--calib-max-length", "128", "--max-length", "128",
              "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp_path / "q"), "--set", "fit_temperature_rows=32"]) == 0
    out = capsys.readouterr().out
    assert "faithful" in out and "GPTQ (gptq_torch)" in out
    written = json.loads((tmp_path / "q" / "lmsys_contract.json").read_text())
    fitted = written["temperature"]  # refitted on the quantised model's own TTA output over the holdout
    assert 50 <= fitted["rows"] <= 60 and fitted["log_loss_after"] <= fitted["log_loss_before"]  # rule rows: priors
    assert "swap-TTA averaged" in fitted["fitted_on"] and f"temperature {fitted['value']:.3f} fitted" in out
    assert "temperature_carried" in written
    saved = json.loads((tmp_path / "q" / "fidelity.json").read_text())
    assert saved["rows"] == 60 and saved["kl_mean"] <= 1e-3
    assert cli.main([*common, "--out", str(tmp_path / "q2"), "--max-mean-kl", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert "not faithful" in err and "max_mean_kl 1e-12" in err and (tmp_path / "q2" / "fidelity.json").exists()
    with pytest.raises(quantize.QuantizedCheckpointError, match="failed its fidelity check"):
        quantize.load_quantized(tmp_path / "q2", log=lambda _: None)  # a rejected folder is not used by mistake
    assert json.loads((tmp_path / "q" / "fidelity.json").read_text())["passed"] is True


def test_both_orders_side_by_side_at_toy_scale(tmp_path, tokenizer, synth_frame):
    """16-bit LoRA → merge → GPTQ-8 vs QLoRA on an nf4 base, same data: the table CI produces (see RESULTS)."""
    from lmsys_lib import orders
    from lmsys_lib.config import ModelConfig, TrainConfig

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "base")
    table = orders.compare_orders(
        base, synth_frame.iloc[:400], synth_frame.iloc[400:520],
        ModelConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, head_init="model"),
        TrainConfig(epochs=1, batch_size=16, grad_accum=1, lr=2e-3, eval_every=10, checkpoint_every=0),
        PackConfig(max_length=128), QuantizeConfig(group_size=32, calib_rows=24, calib_max_length=128),
        tmp_path / "work", log=lambda _: None)
    assert list(table["order"]) == ["16-bit LoRA → merge (not quantised)", "16-bit LoRA → merge → GPTQ-8",
                                    "QLoRA on nf4 base (adapter unmerged)"]
    assert np.isfinite(table["log_loss"]).all() and (table["rows_per_s"] > 0).all()
    sixteen, gptq, qlora = table.itertuples()
    assert gptq.disk_mib < sixteen.disk_mib and abs(gptq.log_loss - sixteen.log_loss) < 0.01
    assert qlora.memory_mib < sixteen.memory_mib  # the nf4 base is 4-bit in memory
    assert table.attrs["test_rows"] == 120 and (tmp_path / "work" / "qlora" / "adapter").exists()


def test_widths_gptq_cannot_pack_are_refused_up_front(tmp_path, tokenizer):
    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "b48", hidden=48)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).save_pretrained(tmp_path / "c48")
    modeling.load_tokenizer(base).save_pretrained(tmp_path / "c48")
    with pytest.raises(ValueError, match="multiples of 32.*'q_proj in': 48"):
        quantize.quantize(tmp_path / "c48", tmp_path / "x", [[1, 2, 3]], CFG, device="cpu")


def test_inference_on_a_gptq_model_survives_a_nan_batch(quantised, synth_frame):
    """A quantised model cannot be cast to fp32 (transformers refuses): the NaN rows are re-run alone in
    their own dtype, and the weights are left as they were."""
    from lmsys_lib import inference
    from lmsys_lib.config import InferenceConfig

    family, _, qdir = quantised
    if family != "llama":
        pytest.skip("one architecture is enough")
    model, tok, _ = quantize.load_quantized(qdir, "cpu", log=lambda _: None)
    calls = {"n": 0}

    def nan_once(module, args, output):
        calls["n"] += 1
        if calls["n"] == 1:
            output.logits = torch.full_like(output.logits, float("nan"))
        return output

    handle = model.register_forward_hook(nan_once)
    cfg = InferenceConfig(pack=PACK, tta=False, rule_priors=False, token_budget=100000, max_batch_rows=64,
                          degrade_max_length=128)
    probs, report = inference.score(model, tok, synth_frame.iloc[:12], cfg, progress=False, log=lambda _: None)
    handle.remove()
    assert report["nan_rows"] == 12 and report["sources"] == {"model:no-tta": 12} and not report["errors"]
    assert np.isfinite(probs).all() and model.dtype == modeling.cpu_dtype()  # fp32 without native bf16
