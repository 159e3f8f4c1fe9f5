"""The prepared GPU check runs, in its smoke mode, on the CPU — so the script a GPU session runs once cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["device"] == "CPU"
    for section in ("inference", "quantize", "train"):
        rows = report[section]["results"]
        measured = [r for r in rows if "tokens_per_s" in r]
        assert measured and all(r["tokens_per_s"] > 0 and r["ratio"] > 0 for r in measured), (section, rows)
    inference = report["inference"]
    assert [r["method"].split(",")[0] for r in inference["results"]] == ["emiz6413 loop", "our kernel", "our kernel"]
    assert inference["naive_vs_ours_max_abs"] < 1e-5  # the baseline computes the same numbers, only slower
    assert inference["kl_sdpa_vs_eager"] >= 0 and inference["agreement_sdpa_vs_eager"] > 0.9
    assert {r["precision"] for r in report["train"]["results"]} >= {"bf16-naive", "bf16", "fp16"}
    assert "inference ·" in run.stdout and "quantize ·" in run.stdout and "train ·" in run.stdout
