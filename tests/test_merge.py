"""Fold fusion: the exact merge equals W + mean_k(s_k·B_k·A_k); the adapter form agrees; the naive one does not."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmsys_lib import batching, merge, modeling
from lmsys_lib.config import ModelConfig


def _fold_adapters(base, root, k=3, r=4, alpha=8, rslora=False):
    """k adapters of one base with random A, B and heads (as k trained folds would have)."""
    paths = []
    for fold in range(k):
        torch.manual_seed(100 + fold)
        model, _ = modeling.load_classifier(ModelConfig(model_dir=str(base), lora_r=r, lora_alpha=alpha,
                                                        lora_dropout=0.0))
        if rslora:
            model.peft_config["default"].use_rslora = True
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "score" in name:
                    p.normal_(0, 0.2)
        model.save_pretrained(root / f"fold{fold}" / "adapter")
        paths.append(root / f"fold{fold}" / "adapter")
    return paths


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def base(request, tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp(f"base-{request.param}")
    return modeling.save_tiny_checkpoint(request.param, copy.deepcopy(tokenizer), out)


def _rows(tok):
    texts = ["a short row", "a somewhat longer second row of words", "third", "and the fourth row is here"]
    return batching.collate([tok(t)["input_ids"] for t in texts], tok.pad_token_id)


def test_exact_merge_is_w_plus_mean_of_scaled_updates(base, tmp_path):
    adapters = _fold_adapters(base, tmp_path / "folds", rslora=True)
    out = merge.merge_exact(base, adapters, tmp_path / "merged", log=lambda _: None)
    merged = load_file(out / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    folds = [load_file(p / "adapter_model.safetensors") for p in adapters]
    checked = 0
    for key, w in base_w.items():
        module = key[:-len(".weight")]
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key not in folds[0]:
            continue
        s = 8 / np.sqrt(4)  # rsLoRA: α/√r
        delta = np.mean([s * f[a_key.replace("lora_A", "lora_B")].double().numpy() @ f[a_key].double().numpy()
                         for f in folds], axis=0)
        want = w.double().numpy() + delta
        got = merged[key].double().numpy()
        assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want), key
        checked += 1
    assert checked == 7 * 2  # every q/k/v/o/gate/up/down of both layers
    head = np.mean([f["base_model.model.score.weight"].numpy() for f in folds], axis=0)
    assert np.allclose(merged["score.weight"].numpy(), head, atol=1e-7)
    assert not any(k.startswith("lm_head") for k in merged)


def test_merged_checkpoint_reloads_and_equals_the_exact_adapter_form(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    adapters = _fold_adapters(base, tmp_path / "folds")
    out = merge.merge_exact(base, adapters, tmp_path / "merged", log=lambda _: None)
    tok = modeling.load_tokenizer(out)
    attn = modeling.attention_for(AutoConfig.from_pretrained(out), "auto")
    merged = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation=attn).eval()
    assert merged.config.num_labels == 3 and merged.config.pad_token_id == tok.pad_token_id
    cat = merge.exact_adapter(adapters, tmp_path / "cat")
    assert json.loads((cat / "adapter_config.json").read_text())["r"] == 12  # Σ r_k
    plain, _ = modeling.load_classifier(ModelConfig(model_dir=str(base), lora_r=0))
    stacked = PeftModel.from_pretrained(plain, cat).eval()
    batch = _rows(tok)
    with torch.no_grad():
        a, b = merged(**batch).logits, stacked(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    merged.save_pretrained(tmp_path / "again")  # reload → save → reload predicts the same
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "again", attn_implementation=attn).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, a)


def test_naive_average_is_not_the_mean_update_and_its_error_is_reported(base, tmp_path):
    adapters = _fold_adapters(base, tmp_path / "folds")
    error = merge.weight_error(adapters)
    assert error["relative_frobenius"] > 0.1 and error["max_module_relative"] >= error["relative_frobenius"]
    assert merge.weight_error(adapters[:1])["relative_frobenius"] == pytest.approx(0.0, abs=1e-7)  # one fold: same


def test_sharded_output_loads_and_matches(base, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    adapters = _fold_adapters(base, tmp_path / "folds", k=2)
    one = merge.merge_exact(base, adapters, tmp_path / "one", log=lambda _: None)
    many = merge.merge_exact(base, adapters, tmp_path / "many", max_shard_bytes=200_000, log=lambda _: None)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (many / "model.safetensors").exists()
    attn = modeling.attention_for(AutoConfig.from_pretrained(one), "auto")
    batch = _rows(modeling.load_tokenizer(one))
    with torch.no_grad():
        a = AutoModelForSequenceClassification.from_pretrained(one, attn_implementation=attn).eval()(**batch).logits
        b = AutoModelForSequenceClassification.from_pretrained(many, attn_implementation=attn).eval()(**batch).logits
    assert torch.equal(a, b)


def _small_updates(paths, scale, same_head=False):
    """Rescale each adapter's B so that ΔW is ``scale`` × its size (a trained fold's update is small);
    ``same_head``: every fold gets the first fold's head (then the merge differs from the ensemble by the
    weight updates alone)."""
    from safetensors.torch import save_file

    head = {k: v for k, v in load_file(paths[0] / "adapter_model.safetensors").items() if ".score." in k}
    for path in paths:
        weights = load_file(path / "adapter_model.safetensors")
        weights = {k: v * scale if "lora_B" in k else v for k, v in weights.items()} | (head if same_head else {})
        save_file(weights, path / "adapter_model.safetensors")


def test_a_bf16_base_merges_in_fp32_and_stores_what_keeps_the_update(tmp_path, tokenizer):
    """W + ΔW computed in fp32, cast once to the storage dtype. A small update is below bf16's resolution of
    W: stored in the base's bf16 most of ΔW is lost; fp32 (the default) keeps it, fp16 keeps more than bf16.
    Untouched weights keep the base's dtype, and config.json says bf16 — what the folds ran in."""
    from transformers import AutoModelForCausalLM

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "b32")
    AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(tmp_path / "b16")
    copy.deepcopy(modeling.load_tokenizer(base)).save_pretrained(tmp_path / "b16")
    adapters = _fold_adapters(tmp_path / "b16", tmp_path / "folds", k=2)
    _small_updates(adapters, 1e-4)  # ΔW ~ 1e-5 against weights ~ 0.02 (bf16 half-ulp there: 6e-5)
    w = load_file(tmp_path / "b16" / "model.safetensors")
    ad = merge.read_adapters(adapters)
    key = "model.layers.0.self_attn.q_proj"
    delta = merge.mean_delta(ad, key)
    lost = {}
    for storage in ("fp32", "fp16", "base"):
        out = merge.merge_exact(tmp_path / "b16", adapters, tmp_path / storage, log=lambda _: None, storage=storage)
        merged = load_file(out / "model.safetensors")
        want = (w[f"{key}.weight"].float() + delta).to(merged[f"{key}.weight"].dtype)
        assert torch.equal(merged[f"{key}.weight"], want)  # the one cast
        assert merged["model.embed_tokens.weight"].dtype == torch.bfloat16  # untouched: as the base
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        update = merged[f"{key}.weight"].float() - w[f"{key}.weight"].float()  # what the stored merge adds
        lost[storage] = float((update - delta).norm() / delta.norm())
        record = json.loads((out / "lmsys_merge.json").read_text())
        assert record["storage_dtype"] == {"fp32": "float32", "fp16": "float16", "base": "bfloat16"}[storage]
    assert lost["fp32"] < 1e-4 and lost["fp16"] < lost["base"]
    assert lost["base"] > 0.5  # bf16 storage: most of the fold ensemble's update is gone


def test_fp16_storage_refuses_values_beyond_its_range(tmp_path, tokenizer):
    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "b")
    adapters = _fold_adapters(base, tmp_path / "folds", k=1)
    _small_updates(adapters, 1e7)
    with pytest.raises(ValueError, match="overflow fp16"):
        merge.merge_exact(base, adapters, tmp_path / "m", log=lambda _: None, storage="fp16")


def test_fidelity_report_switches_adapters_on_one_base_and_scores_each_storage(tmp_path, tokenizer, synth_frame):
    from lmsys_lib.config import PackConfig

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "b")
    adapters = _fold_adapters(base, tmp_path / "folds", k=2)
    _small_updates(adapters, 3e-3, same_head=True)  # small, as trained folds' are: the mean ≈ the ensemble
    merged = merge.merge_exact(base, adapters, tmp_path / "merged", log=lambda _: None)
    report = merge.fidelity_report(base, adapters, merged, synth_frame.iloc[:16], PackConfig(max_length=160),
                                   log=lambda _: None, device="cpu", dtype="fp32")
    assert report["storage_dtype"] == "fp32" and report["dtype"] == "float32"
    assert {"kl_ensemble_exact_fp32", "kl_ensemble_exact_fp16", "kl_ensemble_exact_bf16"} <= set(report)
    assert report["kl_ensemble_exact"] == report["kl_ensemble_exact_fp32"]
    assert report["kl_ensemble_exact_fp32"] < report["kl_ensemble_exact_fp16"] < report["kl_ensemble_exact_bf16"]
    # the fold ensemble from the switched adapters equals each fold loaded alone on a fresh base
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmsys_lib.metrics import softmax
    from lmsys_lib.prompting import Packer

    tok = modeling.load_tokenizer(base)
    ids = list(Packer(tok, PackConfig(max_length=160)).pack_frame(synth_frame.iloc[:16])["input_ids"])
    alone = []
    for path in adapters:
        fresh = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
        modeling.set_pad(fresh, tok)
        alone.append(softmax(modeling.predict_logits(PeftModel.from_pretrained(fresh, path), ids, tok.pad_token_id)))
    assert np.allclose(np.mean(alone, axis=0), report["probs"]["ensemble"], atol=1e-6)


def test_quantised_base_is_refused_and_nf4_training_is_said(base, tmp_path):
    adapters = _fold_adapters(base, tmp_path / "folds", k=2)
    for path in adapters:
        (path.parent / "fit_config.json").write_text(json.dumps({"model": {"quantization": "nf4"}}))
    said = []
    merge.merge_exact(base, adapters, tmp_path / "merged", log=said.append)
    assert any("trained on a 4-bit (nf4) base" in s and "16-bit weights" in s for s in said)
    stored_4bit = tmp_path / "q"
    stored_4bit.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (stored_4bit / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stored quantised"):
        merge.merge_exact(stored_4bit, adapters, tmp_path / "m2", log=said.append)


def test_mismatched_or_unmergeable_adapters_are_refused(base, tmp_path):
    a = _fold_adapters(base, tmp_path / "a", k=1)[0]
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        merge.read_adapter(a)
    with pytest.raises(FileNotFoundError, match="fold"):
        merge.fold_adapters(tmp_path / "nothing")


def test_base_without_a_pad_token_merges_into_a_loadable_checkpoint(tmp_path):
    """The classifier adds a pad token (no candidate in the vocabulary): the merged embedding and config grow."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = ["a short row", "a somewhat longer second row of words", "third", "and the fourth row is here"] * 20
    raw.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", bos_token="<bos>")
    assert modeling.choose_pad_token(tok)[1]  # a pad token must be added
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(modeling.tiny_config("llama", len(tok))).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapters = _fold_adapters(tmp_path / "base", tmp_path / "folds", k=2)
    out = merge.merge_exact(tmp_path / "base", adapters, tmp_path / "merged", log=lambda _: None)
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.vocab_size == len(tok) + 1 == merged.get_input_embeddings().weight.shape[0]
