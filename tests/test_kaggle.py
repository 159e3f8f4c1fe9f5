"""Environment detection and the path resolver."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmsys_lib import kaggle


def test_detect_env(monkeypatch):
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "COLAB_RELEASE_TAG", "COLAB_GPU"):
        monkeypatch.delenv(var, raising=False)
    assert kaggle.detect_env() == "local"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    assert kaggle.detect_env() == "colab"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert kaggle.detect_env() == "kaggle"


def test_competition_dir(tmp_path):
    assert kaggle.competition_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kaggle.competition_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no data folder given"):
        kaggle.competition_dir(env="local")
    assert str(kaggle.runs_root("kaggle")) == "/kaggle/working/runs"


def test_run_dir(tmp_path):
    assert kaggle.run_dir("exp1", root=tmp_path).is_dir()
    with pytest.raises(ValueError, match="plain folder name"):
        kaggle.run_dir("../escape", root=tmp_path)


def test_inference_kernel_metadata_is_submittable_offline():
    """The 2×T4 submission kernel: GPU shape, internet off (written out: the CLI defaults it to on), the
    competition and the wheel/model datasets as sources, slug = slugify(title), code_file present."""
    import json
    import re

    folder = Path(__file__).resolve().parents[1] / "kernel-metadata" / "arena-distill-05-inference-2xt4"
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["enable_gpu"] is True
    assert meta["enable_internet"] is False
    assert meta["competition_sources"] == ["lmsys-chatbot-arena"]
    assert {s.split("/")[1] for s in meta["dataset_sources"]} == {"arena-distill-wheels", "arena-distill-student-gptq"}
    slug = re.sub(r"[^a-z0-9]+", "-", meta["title"].lower()).strip("-")
    assert meta["id"].split("/")[1] == slug == folder.name
    assert (folder / meta["code_file"]).is_file() and len(meta["title"]) >= 5
