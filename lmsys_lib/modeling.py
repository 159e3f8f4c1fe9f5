"""A 3-class preference classifier from any HF decoder checkpoint, with LoRA / QLoRA and a dtype policy.

Contract:
- ``load_classifier(cfg, device)`` returns ``(model, tokenizer)``: a ``*ForSequenceClassification`` with
  ``num_labels = 3`` (A, B, tie) whose score head pools the rightmost non-pad token. The pad token is
  always distinct from EOS and from every id the packer emits (a pad equal to EOS would let a real EOS in
  the text be taken for padding); batches are right-padded, so real tokens keep positions 0..n-1.
- With ``lora_r > 0`` only the LoRA matrices and the score head train; every base weight stays
  bit-identical. With ``quantization="nf4"`` the base is loaded in 4-bit (QLoRA).
- Mixed precision: the compute dtype follows ``dtype_for`` — bf16 on sm >= 80, fp16 on older GPUs (T4,
  sm75, has no bf16), fp32 on CPU. Frozen base weights are stored in it (or in 4-bit); every trainable
  tensor (LoRA A/B, the score head and any other ``modules_to_save``, all weights under full fine-tuning) is
  an fp32 master copy, and forwards run under ``autocast(device, dtype)``. (A bf16 master drops every
  update below half a bf16 ulp: at lr 1e-5 most of a 0.02-sized head never moves; fp16 masters without
  loss scaling underflow in AdamW's second moment.) fp16 needs a ``GradScaler``, which ``train`` keeps.
- Attention (``attention_for``): Gemma-2 soft-caps attention logits, which SDPA ignores — flash-attention-2
  (which applies the cap) where it is installed on sm >= 80, else eager; SDPA for families without a cap.
- Loading goes straight onto the given device (``device_map={"": device}``): a process never holds a
  host copy of the weights on its way to its GPU.
- CPU dtype policy (``cpu_dtype``): a CPU without native bf16 instructions (AVX2-only x86: Intel before
  Cooper Lake / Sapphire Rapids, AMD before Zen 4) runs bf16 and fp16 matmuls through slow fallback
  kernels — measured 1.2 GFLOP/s against 179 in fp32 on a 2-core AMD EPYC (AVX2) — so every stage that
  runs a model on a CPU without asking for a dtype (GPTQ calibration and its kernels, fidelity reports,
  inference) computes in fp32 there, and in bf16 only where the CPU has native bf16 *and* a 256³ matmul
  measured once per process confirms it is at least as fast. The choice and its reason are logged.
  ``$LMSYS_CPU_DTYPE`` (fp32 / bf16 / fp16) forces it. Training on a CPU keeps fp32 weights in any case:
  pure bf16 weights drop updates below half a bf16 ulp.

Rank and device are passed in, never queried in a constructor. torch/transformers/peft imports are local.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ModelConfig

NUM_LABELS = 3
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")
TINY_FAMILIES = ("gemma2", "gemma3_text", "llama", "qwen2")
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_(\d+)\|>|<unused(\d+)>")  # Llama-3, Gemma


CPU_DTYPE_ENV = "LMSYS_CPU_DTYPE"
DTYPE_NAMES = ("fp32", "bf16", "fp16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 / AMX; Arm's "bf16" feature


def _dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def dtype_for(device: Any, requested: str = "auto") -> Any:
    """Training dtype for ``device``: explicit when requested, else bf16 (sm >= 80), fp16 (older GPU), fp32
    (CPU: fp32 weights whatever the CPU, so small updates are never rounded away)."""
    import torch

    if requested != "auto":
        return _dtype(requested)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def compute_dtype(device: Any, requested: str = "auto", log: Callable[[str], None] = print) -> Any:
    """The dtype a model *runs* in on ``device`` (GPTQ calibration, quantised kernels, fidelity, inference):
    explicit when requested; fp16 on a CUDA GPU (what a T4 runs; GPTQ Marlin on sm75 takes fp16 only);
    ``cpu_dtype()`` on a CPU; bf16 on other accelerators."""
    import torch

    if requested != "auto":
        return _dtype(requested)
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_dtype(log)
    return torch.float16 if kind == "cuda" else torch.bfloat16


def cpu_dtype(log: Callable[[str], None] = print) -> Any:
    """fp32 unless this CPU computes bf16 natively and measurably no slower (``$LMSYS_CPU_DTYPE`` forces a
    dtype). Decided once per process (``cpu_dtype_choice``); the choice and its reason are logged."""
    name, reason = cpu_dtype_choice()
    log(f"CPU compute dtype: {name} — {reason}")
    return _dtype(name)


@functools.lru_cache(maxsize=1)
def cpu_dtype_choice() -> tuple[str, str]:
    """(dtype name, why) for this process: the environment override, else flags + a 256³ matmul timing."""
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in DTYPE_NAMES:
            raise ValueError(f"${CPU_DTYPE_ENV}={forced!r}: expected one of {DTYPE_NAMES}")
        return forced, f"forced by ${CPU_DTYPE_ENV}"
    probe = cpu_probe()
    native = probe["native_bf16"]
    speed = f"matmul fp32 {probe['gflops']['fp32']:.1f} GFLOP/s, bf16 {probe['gflops']['bf16']:.1f}"
    flags = f"ISA {probe['capability']}, native bf16 flags {probe['bf16_flags'] or 'none'}"
    if native is not False and probe["gflops"]["bf16"] >= probe["gflops"]["fp32"]:
        return "bf16", f"{flags}; {speed}: bf16 is native and no slower"
    why = "no native bf16" if native is False else "bf16 measured slower"
    return "fp32", f"{flags}; {speed}: {why}, so fp32"


@functools.lru_cache(maxsize=1)
def cpu_probe(size: int = 256, seconds: float = 0.02) -> dict[str, Any]:
    """What this CPU offers: torch's ISA level, the native-bf16 flags of ``/proc/cpuinfo`` (``native_bf16``
    None where the flags cannot be read) and the GFLOP/s of a ``size``³ matmul per dtype (each timed for
    about ``seconds`` after one warm-up; a slow fallback kernel stops after one call)."""
    import torch

    flags = cpu_flags()
    found = sorted(set(NATIVE_BF16_FLAGS) & flags) if flags is not None else []
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16_flags": found,
            "native_bf16": bool(found) if flags is not None else None,
            "gflops": {name: matmul_gflops(_dtype(name), size, seconds) for name in DTYPE_NAMES}}


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or None where they cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", text, flags=re.MULTILINE)
    return set(match.group(1).split()) if match else None


def matmul_gflops(dtype: Any, size: int = 256, seconds: float = 0.02, rows: int | None = None,
                  cols: int | None = None) -> float:
    """GFLOP/s of a (rows × size) @ (size × cols) matmul in ``dtype`` on the CPU (rows, cols default to
    size), after one warm-up call."""
    import torch

    rows, cols = rows or size, cols or size
    a, b = torch.randn(rows, size).to(dtype), torch.randn(size, cols).to(dtype)
    a @ b
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2.0 * rows * size * cols * calls / (time.perf_counter() - start) / 1e9



def sdpa_without_softcap(model: Any) -> int:
    """Switch a loaded Gemma-2-style model to sdpa attention with its attention-logit soft-capping off — the
    faster, inexact candidate an attention gate must measure against eager (transformers refuses sdpa for
    Gemma-2 while soft-capping is set, and its attention modules keep their own copy of the cap). Returns
    how many attention modules were changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "attn_logit_softcapping", None) is not None:
            module.attn_logit_softcapping = None
            changed += 1
    model.config.attn_logit_softcapping = None
    model.config._attn_implementation = "sdpa"
    return changed


def attention_for(model_config: Any, requested: str = "auto", device: Any = "cpu") -> str:
    """The attention kernel for ``model_config`` on ``device``: SDPA unless the checkpoint soft-caps
    attention logits (Gemma-2), which SDPA silently drops; then flash-attention-2 (it applies the cap; needs
    sm >= 80 and the ``flash_attn`` package) or else eager (exact, O(length²) memory: a T4's case)."""
    if requested != "auto":
        return requested
    if not getattr(model_config, "attn_logit_softcapping", None):
        return "sdpa"
    return "flash_attention_2" if flash_attention_usable(device) else "eager"


def flash_attention_usable(device: Any) -> bool:
    """Whether flash-attention-2 runs on ``device``: a CUDA GPU of sm >= 80 with a ``flash_attn`` that
    transformers can import (an install built for another torch fails that check, and eager is used)."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8 or not is_flash_attn_2_available():
        return False
    try:  # the availability check only finds the package: an install built for another torch fails here
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def autocast(device: Any, dtype: Any) -> Any:
    """The mixed-precision context for a forward on ``device``: autocast to ``dtype`` (bf16 / fp16), or
    nothing for fp32."""
    from contextlib import nullcontext

    import torch

    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _undo_upcast(model: Any, stored: dict[str, Any], dtype: Any) -> None:
    """Cast back to ``dtype`` the frozen tensors that were stored in it and are fp32 now (what
    ``prepare_model_for_kbit_training`` upcast); 4-bit storage and tensors kept in fp32 on purpose stay."""
    import torch

    for name, param in model.named_parameters():
        if (not param.requires_grad and stored.get(name) == dtype and param.dtype == torch.float32
                and type(param).__name__ != "Params4bit"):
            param.data = param.data.to(dtype)


def upcast_trainable(model: Any) -> list[str]:
    """Make every trainable tensor an fp32 master copy (frozen weights keep their dtype); returns the names
    of the tensors that were cast."""
    import torch

    cast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast.append(name)
    return cast


def choose_pad_token(tokenizer: Any) -> tuple[str, bool]:
    """(pad token, whether it must be added to the vocabulary). Never EOS, never BOS.

    The tokenizer's own pad; else a known pad-like token; else the lowest-numbered reserved special token
    (Llama-3's ``<|reserved_special_token_N|>``, Gemma's ``<unusedN>``) — text never produces one, and
    taking it keeps the vocabulary: a token added instead grows the embedding, which is then trained and
    saved with every adapter (~4 GB at Llama-3-70B's 128k × 8,192).
    """
    avoid = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in avoid:
        return tokenizer.pad_token, False
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in avoid:
            return candidate, False
    reserved = sorted((int(m.group(1) or m.group(2)), token) for token in vocab
                      if (m := RESERVED_TOKEN.fullmatch(token)))
    if reserved:
        return reserved[0][1], False
    return "<pad>", True


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer with a pad token distinct from EOS/BOS and right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad, added = choose_pad_token(tokenizer)
    if added:
        tokenizer.add_special_tokens({"pad_token": pad})
    else:
        tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    return tokenizer


def load_classifier(cfg: ModelConfig, device: Any = "cpu", tokenizer: Any = None) -> tuple[Any, Any]:
    """Load ``cfg.model_dir`` as a 3-class classifier (LoRA attached when ``lora_r > 0``).

    Args:
        cfg: the model config; ``cfg.model_dir`` holds a HF checkpoint and its tokenizer.
        device: where the model goes ("cpu", "cuda:0", …); a 4-bit base is placed by bitsandbytes.
        tokenizer: reuse an already loaded tokenizer (else ``load_tokenizer(model_dir)``).
    Returns:
        (model, tokenizer) — the model in train mode with only the intended parameters trainable, those in
        fp32; forwards go under ``autocast(device, dtype_for(device, cfg.dtype))``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not cfg.model_dir or not Path(cfg.model_dir, "config.json").exists():
        raise FileNotFoundError(f"model_dir {cfg.model_dir!r} holds no config.json (a HF checkpoint folder)")
    tokenizer = tokenizer or load_tokenizer(cfg.model_dir)
    base_config = AutoConfig.from_pretrained(cfg.model_dir)
    device = torch.device(device)
    compute = dtype_for(device, cfg.dtype)
    kwargs: dict[str, Any] = {"num_labels": NUM_LABELS,
                              # full fine-tuning trains every weight: all of them are fp32 masters
                              "dtype": torch.float32 if cfg.lora_r == 0 else compute,
                              "attn_implementation": attention_for(base_config, cfg.attn_implementation, device),
                              # straight onto this process's device (index given: DDP's local rank)
                              "device_map": {"": device.index or 0} if device.type == "cuda" else {"": str(device)}}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(compute)
    model, info = AutoModelForSequenceClassification.from_pretrained(cfg.model_dir, output_loading_info=True,
                                                                     **kwargs)
    set_pad(model, tokenizer)
    if cfg.head_init == "scaled" and any(k.split(".")[0] == "score" for k in info["missing_keys"]):
        init_head(model)
    model = attach_adapters(model, cfg, compute)
    upcast_trainable(model)
    return model, tokenizer


def init_head(model: Any) -> None:
    """Re-draw a new score head with std 1/hidden_size so the untrained classifier starts near uniform.

    Pretrained decoders emit final hidden states with norms in the tens to hundreds; the checkpoint's own
    init (std 0.02) then gives initial logits of several units — measured initial held-out log loss 3.7 on
    Gemma-3 270M and 2.0 on SmolLM2-135M against 1.0986 for uniform — and the first steps are spent
    undoing that. A head loaded from the checkpoint (a post-pretrained base) is never touched.
    """
    import torch

    head = model.score
    if type(head) is not torch.nn.Linear:  # a quantised head is left as loaded
        return
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / head.weight.shape[1])
        if head.bias is not None:
            head.bias.zero_()


def set_pad(model: Any, tokenizer: Any) -> None:
    """Give ``model`` the tokenizer's pad id (growing the embeddings when the pad token was added)."""
    if tokenizer.pad_token_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def nf4_config(compute_dtype: Any) -> Any:
    """bitsandbytes 4-bit NF4 with double quantisation (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype)  # lets FSDP shard the packed weights


GRADIENT_CHECKPOINTING = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, no hooks needed


def attach_adapters(model: Any, cfg: ModelConfig, compute: Any = None) -> Any:
    """LoRA on ``cfg.target_modules`` + a fully trained score head; or everything trainable (r = 0).
    Gradient checkpointing, when asked, is enabled once, non-reentrant (for QLoRA through
    ``prepare_model_for_kbit_training``, which would otherwise re-enable it reentrant). For QLoRA the frozen
    16-bit tensors (embeddings, norms), which that call upcasts to fp32, go back to ``compute``: under
    autocast fp32 copies buy nothing and cost 2 bytes a weight (~2 GiB at 70B)."""
    if cfg.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        stored = {name: p.dtype for name, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING)
        if compute is not None:
            _undo_upcast(model, stored, compute)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING)
    if cfg.lora_r == 0:
        model.train()
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules))
    model = get_peft_model(model, lora)  # SEQ_CLS: the score head is in modules_to_save, trained in full
    model.train()
    return model


def trainable_state(model: Any) -> dict[str, Any]:
    """Name → tensor of every trainable parameter (what a checkpoint must hold to resume)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# -- tiny models for tests and the demo ----------------------------------------------------------------


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, pad_token_id: int = 0) -> Any:
    """A small config of a real architecture (gemma2, gemma3_text, llama, qwen2) for CPU tests."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"family {family!r} not in {TINY_FAMILIES}")
    return AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                head_dim=hidden // heads, num_labels=NUM_LABELS, pad_token_id=pad_token_id,
                                max_position_embeddings=4096)


def save_tiny_checkpoint(family: str, tokenizer: Any, out_dir: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """A randomly initialised decoder of ``family`` sized for ``tokenizer``, saved with it as a checkpoint
    folder (safetensors) — so tests take the same from_pretrained path as real models."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    pad, added = choose_pad_token(tokenizer)
    if added:
        tokenizer.add_special_tokens({"pad_token": pad})
    config = tiny_config(family, len(tokenizer), pad_token_id=tokenizer.convert_tokens_to_ids(pad), **sizes)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def logits_of_batches(model: Any, ids: list[Any], batches: list[list[int]], pad_id: int,
                      device: Any = "cpu", dtype: Any = None) -> list[tuple[list[int], Any]]:
    """Run ``model`` (eval mode, no grad; under ``autocast(device, dtype)`` when a compute dtype is given)
    on the given row batches; returns (rows, fp32 logits) per batch. The model's train/eval mode is restored
    afterwards."""
    from contextlib import nullcontext

    import torch

    from .batching import collate

    was_training = model.training
    model.eval()
    results = []
    with torch.no_grad(), (autocast(device, dtype) if dtype is not None else nullcontext()):
        for rows in batches:
            batch = collate([ids[r] for r in rows], pad_id)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            results.append((rows, out.logits.float().cpu().numpy()))
    model.train(was_training)
    return results


def predict_logits(model: Any, ids: list[Any], pad_id: int, batch_size: int = 8, device: Any = "cpu",
                   dtype: Any = None) -> Any:
    """(n, 3) fp32 logits in input order, one process; batches length-sorted (little padding); under
    autocast to ``dtype`` when given."""
    import numpy as np

    from .batching import sorted_batches

    logits = np.zeros((len(ids), 3), dtype=np.float32)
    for rows, block in logits_of_batches(model, ids, sorted_batches([len(x) for x in ids], batch_size), pad_id,
                                         device, dtype):
        logits[rows] = block
    return logits
