"""Notebooks run headless (papermill, a real kernel) on the embedded default and write their artefacts."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_thin(path):
    nb = nbformat.read(path, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "no papermill parameters cell"
    logic = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.For, ast.While,
             ast.comprehension)
    for source in _code_cells(path):
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        found = [type(node).__name__ for node in ast.walk(ast.parse(code)) if isinstance(node, logic)]
        assert not found, f"logic belongs in lmsys_lib, not in a notebook cell: {found}"
        assert source.count("\n") <= 12
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"


def test_eda_notebook_runs_headless(synth_dir, tmp_path):
    out_dir = tmp_path / "eda"
    pm.execute_notebook(str(NOTEBOOKS / "00_eda.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"data_dir": str(synth_dir), "out_dir": str(out_dir), "fraction": 0.5},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    report = (out_dir / "eda.md").read_text()
    for section in ("## Labels", "## Token lengths", "## Outcome vs length difference", "## Special rows",
                    "## Per-model win rates"):
        assert section in report
    pngs = sorted(p.name for p in (out_dir / "plots").glob("*.png"))
    assert pngs == ["labels.png", "model_win_rates.png", "token_lengths.png", "win_rate_by_length.png"]
    assert all((out_dir / "plots" / p).stat().st_size > 5_000 for p in pngs)
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4


def test_eda_notebook_without_data_says_what_to_pass(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="no data folder given"):
        pm.execute_notebook(str(NOTEBOOKS / "00_eda.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"out_dir": str(tmp_path)}, kernel_name="python3", progress_bar=False,
                            cwd=str(tmp_path))


def test_teacher_notebook_runs_headless(synth_dir, tokenizer, tmp_path):
    import copy

    from lmsys_lib import modeling

    model_dir = modeling.save_tiny_checkpoint("qwen2", copy.deepcopy(tokenizer), tmp_path / "tiny-qwen2")
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(NOTEBOOKS / "01_teacher_training.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"run_dir": str(run_dir), "data_dir": str(synth_dir), "model_dir": str(model_dir),
                                    "k_folds": 3, "max_length": 128, "lora_r": 4, "lora_alpha": 8, "max_steps": 3,
                                    "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": 0,
                                    "checkpoint_every": 0},
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    oof = pd.read_parquet(run_dir / "teachers" / "teacher" / "oof.parquet")
    assert len(oof) == 800 and oof["id"].is_unique
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
