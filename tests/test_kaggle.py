"""Environment detection and the path resolver."""

from __future__ import annotations

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
