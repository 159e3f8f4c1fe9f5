"""Why the CPU dtype policy chose what it chose: matmul and quantised-model throughput per dtype, on this CPU.

Printed, all measured in one run (nothing is asserted):
1. the CPU (model name, torch's ISA level, the native-bf16 flags) and ``modeling.cpu_dtype_choice()``;
2. GFLOP/s of a 1024×576 @ 576×1536 matmul (a SmolLM2-135M MLP projection at 1,024 tokens) in fp32, bf16 and
   fp16, with the ratio to fp32 — on a CPU without native bf16 the 16-bit ones run through slow fallbacks;
3. one forward of ``--rows`` × ``--tokens`` through a GPTQ-8 checkpoint (SmolLM2-135M from the zoo, quantised
   here in fp32 on ``--calib-rows`` rows, or ``--quantized DIR``, e.g. ``runs/demo/quantized``) with the torch
   kernel in fp32, bf16 and fp16 and GPT-QModel's CPU int8 kernel in fp32, against its unquantised source in
   fp32 (the baseline) and bf16: seconds, tokens/s and the ratio to the fp32 baseline. Load time is printed
   apart; the first forward after a load (kernel set-up, cold caches) is timed apart too. On a CPU
   ``load_quantized`` runs the dequantiser eagerly (``quantize.eager_dequantize``).

    python bench/bench_cpu_dtypes.py                     # ~10 min on a 2-core AVX2 CPU (the 16-bit rows dominate)
    python bench/bench_cpu_dtypes.py --skip-slow         # fp32 rows only (when bf16 is known to be slow)

Point ``TORCHINDUCTOR_CACHE_DIR`` and ``GPTQMODEL_TORCH_EXTENSIONS_DIR`` at new folders for cold-cache timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from lmsys_lib import modeling, quantize, zoo


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_table() -> list[dict[str, Any]]:
    import torch

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        rows.append({"dtype": name, "gflops": modeling.matmul_gflops(dtype, size=576, seconds=0.5, rows=1024, cols=1536)})
    return rows


def build_quantized(work: Path, calib_rows: int, tokens: int) -> tuple[Path, Path]:
    """SmolLM2-135M as a 3-class classifier (the demo's student before training), then GPTQ-8 in fp32."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmsys_lib.config import QuantizeConfig

    source = zoo.prepare_model("smollm2-135m")
    tokenizer = modeling.load_tokenizer(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=3, dtype=torch.bfloat16)
    modeling.set_pad(model, tokenizer)
    model.save_pretrained(work / "merged")
    tokenizer.save_pretrained(work / "merged")
    generator = torch.Generator().manual_seed(0)
    calib = [torch.randint(100, len(tokenizer) - 100, (tokens,), generator=generator).tolist()
             for _ in range(calib_rows)]
    cfg = QuantizeConfig(bits=8, group_size=64, calib_rows=calib_rows, calib_max_length=tokens, dtype="fp32")
    start = time.perf_counter()
    out = quantize.quantize(work / "merged", work / "quantized", calib, cfg, device="cpu", log=print)
    print(f"quantised in fp32 in {time.perf_counter() - start:.0f} s (calibration {calib_rows} × {tokens} tokens)")
    return work / "merged", out


def forward_row(label: str, load, batch: Any) -> dict[str, Any]:
    """Load, one warm-up forward (timed apart: compile, caches), then one timed forward."""
    import torch

    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        model(**batch)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model(**batch)
        seconds = time.perf_counter() - start
    tokens = int(batch["attention_mask"].sum())
    print(f"  {label}: load {loaded:.1f} s, first forward {first:.1f} s, forward {seconds:.2f} s", flush=True)
    return {"model": label, "load_s": loaded, "first_s": first, "forward_s": seconds, "tokens_per_s": tokens / seconds}


def model_table(merged: Path, qdir: Path, rows: int, tokens: int, skip_slow: bool) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForSequenceClassification

    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(100, 40000, (rows, tokens), generator=generator),
             "attention_mask": torch.ones(rows, tokens, dtype=torch.long)}
    quiet = lambda _: None  # noqa: E731

    def dense(dtype):
        return lambda: AutoModelForSequenceClassification.from_pretrained(merged, dtype=dtype).eval()

    def gptq(dtype: str, backend: str = "gptq_torch"):
        return lambda: quantize.load_quantized(qdir, "cpu", backend=backend, dtype=dtype, log=quiet)[0]

    plan = [("unquantised fp32 (baseline)", dense(torch.float32), False),
            ("GPTQ-8 torch kernel fp32", gptq("fp32"), False),
            ("GPTQ-8 int8 kernel fp32", gptq("fp32", "gptq_torch_int8"), True),
            ("unquantised bf16", dense(torch.bfloat16), True),
            ("GPTQ-8 torch kernel bf16", gptq("bf16"), True),
            ("GPTQ-8 torch kernel fp16", gptq("fp16"), True)]
    out = []
    for label, load, slow in plan:
        if slow and skip_slow:
            continue
        try:
            out.append(forward_row(label, load, batch))
        except Exception as err:  # noqa: BLE001 — a kernel that does not load here is reported, not fatal
            print(f"  {label}: unavailable ({str(err).splitlines()[0][:160]})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantized", help="a GPTQ folder to time (with --merged, its unquantised source)")
    parser.add_argument("--merged", help="the unquantised source of --quantized (default: quantize.json's source)")
    parser.add_argument("--rows", type=int, default=4, help="rows in the timed batch")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row")
    parser.add_argument("--calib-rows", type=int, default=16)
    parser.add_argument("--skip-slow", action="store_true", help="time the fp32 rows only")
    args = parser.parse_args()

    probe = modeling.cpu_probe()
    choice, reason = modeling.cpu_dtype_choice()
    print(f"CPU: {cpu_name()}; torch ISA {probe['capability']}; native bf16 flags {probe['bf16_flags'] or 'none'}")
    print(f"policy: {choice} — {reason}\n")
    table = matmul_table()
    print("matmul 1024×576 @ 576×1536")
    for row in table:
        print(f"  {row['dtype']:5s} {row['gflops']:8.1f} GFLOP/s   {row['gflops'] / table[0]['gflops']:7.3f}× fp32")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quantized:
            qdir = Path(args.quantized)
            merged = Path(args.merged or json.loads((qdir / quantize.SIDECAR).read_text())["source"])
            if not (merged / "config.json").is_file():
                raise SystemExit(f"{merged}: no unquantised checkpoint there; pass --merged DIR")
        else:
            merged, qdir = build_quantized(Path(tmp), args.calib_rows, args.tokens)
        print(f"\nforward of {args.rows} × {args.tokens} tokens ({qdir})")
        rows = model_table(merged, qdir, args.rows, args.tokens, args.skip_slow)
    baseline = [r for r in rows if r["model"].endswith("(baseline)")]
    if not baseline:
        raise SystemExit("the fp32 baseline did not run: no ratios to print")
    base = baseline[0]["tokens_per_s"]
    print(f"\n{'model':32s} {'load s':>7s} {'1st fwd s':>9s} {'fwd s':>7s} {'tokens/s':>9s} {'× fp32 dense':>12s}")
    for row in rows:
        print(f"{row['model']:32s} {row['load_s']:7.1f} {row['first_s']:9.1f} {row['forward_s']:7.2f} "
              f"{row['tokens_per_s']:9.0f} {row['tokens_per_s'] / base:12.3f}")


if __name__ == "__main__":
    main()
