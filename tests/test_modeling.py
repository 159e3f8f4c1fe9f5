"""Classifiers from real architectures (tiny configs): LoRA trains only what it should, pads are handled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmsys_lib import batching, losses, modeling
from lmsys_lib.config import ModelConfig


@pytest.fixture(scope="module", params=["gemma2", "llama", "qwen2", "gemma3_text"])
def tiny_dir(request, tmp_path_factory, tokenizer):
    import copy

    out = tmp_path_factory.mktemp(request.param)
    return modeling.save_tiny_checkpoint(request.param, copy.deepcopy(tokenizer), out)


def test_lora_step_changes_adapter_and_head_only(tiny_dir):
    torch.manual_seed(0)
    model, tok = modeling.load_classifier(ModelConfig(model_dir=str(tiny_dir), lora_r=8, lora_alpha=16,
                                                      lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    batch = batching.collate([tok("hello world")["input_ids"], tok("a much longer second row")["input_ids"]],
                             tok.pad_token_id, [0, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA B starts at zero: the second step moves A too
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.step_loss(losses.cross_entropy_sum(logits, batch["labels"]), 2).backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    for name, old in before.items():
        same = torch.equal(old, after[name].detach())
        assert same == (name not in trainable), name  # base bit-identical; every trainable tensor moved


def test_pad_token_is_distinct_and_padding_does_not_change_logits(tiny_dir):
    torch.manual_seed(0)
    model, tok = modeling.load_classifier(ModelConfig(model_dir=str(tiny_dir), lora_r=0))
    model.eval()
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert model.config.pad_token_id == tok.pad_token_id and tok.padding_side == "right"
    rows = [tok("short")["input_ids"], tok("a considerably longer row of text here")["input_ids"]]
    with torch.no_grad():
        batch = batching.collate(rows, tok.pad_token_id)
        together = model(**batch).logits
        alone = torch.cat([model(**batching.collate([r], tok.pad_token_id)).logits for r in rows])
    assert together.shape == (2, 3)
    assert torch.allclose(together, alone, atol=1e-5)  # the score pools each row's last real token


def test_dtype_and_attention_policy():
    assert modeling.dtype_for("cpu") == torch.float32
    assert modeling.dtype_for("cpu", "bf16") == torch.bfloat16
    gemma2 = modeling.tiny_config("gemma2", 100)
    llama = modeling.tiny_config("llama", 100)
    assert gemma2.attn_logit_softcapping and modeling.attention_for(gemma2) == "eager"
    assert modeling.attention_for(llama) == "sdpa" and modeling.attention_for(gemma2, "sdpa") == "sdpa"


def test_pad_token_choice_never_eos(smollm2_tokenizer):
    assert smollm2_tokenizer.pad_token_id == smollm2_tokenizer.eos_token_id  # as shipped
    pad, added = modeling.choose_pad_token(smollm2_tokenizer)
    assert not added and pad == "<|endoftext|>"
    assert smollm2_tokenizer.convert_tokens_to_ids(pad) != smollm2_tokenizer.eos_token_id


def test_full_finetune_and_gradient_checkpointing(tiny_dir):
    model, tok = modeling.load_classifier(ModelConfig(model_dir=str(tiny_dir), lora_r=0,
                                                      gradient_checkpointing=True))
    trainable, total = modeling.count_parameters(model)
    assert trainable == total
    batch = batching.collate([tok("x y z")["input_ids"]], tok.pad_token_id, [1])
    loss = losses.cross_entropy_sum(model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        modeling.load_classifier(ModelConfig(model_dir=str(tmp_path)))


def test_losses_are_sums_normalised_by_rows():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    total = losses.cross_entropy_sum(logits, labels)
    by_hand = -sum(torch.log_softmax(logits, -1)[i, labels[i]] for i in range(3))
    assert torch.allclose(total, by_hand)
    # two micro-batches of a 3-row step give the same gradient as one batch of 3 rows
    w = torch.zeros(3, requires_grad=True)
    for part in (slice(0, 2), slice(2, 3)):
        losses.step_loss(losses.cross_entropy_sum(logits[part] + w, labels[part]), 3).backward()
    grad_acc = w.grad.clone()
    w.grad = None
    (torch.nn.functional.cross_entropy(logits + w, labels)).backward()
    assert torch.allclose(grad_acc, w.grad)
    assert np.isclose(float(losses.step_loss(torch.tensor(6.0), 3, world_size=2)), 4.0)
    with pytest.raises(ValueError, match="rows_in_step"):
        losses.step_loss(total, 0)


def test_qlora_nf4_on_cpu_trains_adapter_only(tokenizer, tmp_path):
    """QLoRA through bitsandbytes' CPU backend: a 4-bit NF4 base stays bit-identical (compared as raw
    bytes — the packed 4-bit storage read as floats holds NaN patterns) while the adapter and head move."""
    import copy

    path = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "tiny")
    torch.manual_seed(0)
    model, tok = modeling.load_classifier(ModelConfig(model_dir=str(path), lora_r=4, lora_alpha=8,
                                                      lora_dropout=0.0, quantization="nf4"))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"

    def raw(p):
        return p.detach().contiguous().view(torch.uint8).clone()

    before = {n: raw(p) for n, p in model.named_parameters()}
    batch = batching.collate([tok("hello world")["input_ids"], tok("another line")["input_ids"]],
                             tok.pad_token_id, [0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.cross_entropy_sum(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], raw(p))}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and torch.isfinite(logits).all()


def test_new_head_starts_near_uniform_and_a_loaded_head_is_kept(tmp_path, tokenizer):
    import copy

    from transformers import AutoModelForSequenceClassification

    tiny = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "tiny", hidden=256)
    torch.manual_seed(0)
    scaled, _ = modeling.load_classifier(ModelConfig(model_dir=str(tiny), lora_r=0))
    torch.manual_seed(0)
    native, _ = modeling.load_classifier(ModelConfig(model_dir=str(tiny), lora_r=0, head_init="model"))
    assert float(scaled.score.weight.std()) == pytest.approx(1 / 256, rel=0.15)
    assert float(native.score.weight.std()) == pytest.approx(0.02, rel=0.15)  # the checkpoint's own init
    scaled.save_pretrained(tmp_path / "with-head")  # a checkpoint that carries a trained head
    copy.deepcopy(tokenizer).save_pretrained(tmp_path / "with-head")
    reloaded, _ = modeling.load_classifier(ModelConfig(model_dir=str(tmp_path / "with-head"), lora_r=0))
    assert torch.equal(reloaded.score.weight, scaled.score.weight)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "with-head").config.num_labels == 3


def test_a_tokenizer_without_pad_gets_a_reserved_token_and_no_new_row(synth_frame, tmp_path):
    """Llama-3 ships no pad: the lowest reserved special token is taken, so the vocabulary (and the
    embedding an adapter would otherwise have to carry) keeps its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmsys_lib import zoo

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_2|>",
                "<|reserved_special_token_0|>", "<|eot_id|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(zoo.conversation_texts(synth_frame[:50]), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert modeling.choose_pad_token(tok) == ("<|reserved_special_token_0|>", False)
    tok.save_pretrained(tmp_path)
    loaded = modeling.load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|reserved_special_token_0|>" and len(loaded) == len(tok)
