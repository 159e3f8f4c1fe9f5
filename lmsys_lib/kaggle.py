"""Where things are: Kaggle, Colab or a local machine, and one resolver for data and run folders.

Contract: every path a stage uses comes from here; nothing else in the package hard-codes a location.
- Kaggle: competition data in ``/kaggle/input/lmsys-chatbot-arena``, outputs under ``/kaggle/working``.
- Colab: outputs under ``/content/drive/MyDrive/arena-distill`` when Drive is mounted (work survives a
  dropped session), else ``/content``.
- Local: outputs under ``./runs``; the data folder must be given (or the demo writes one).

This module never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

COMPETITION = "lmsys-chatbot-arena"
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
COLAB_DRIVE = Path("/content/drive/MyDrive")


def detect_env() -> str:
    """"kaggle", "colab" or "local" (from the variables each platform sets)."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("KAGGLE_URL_BASE"):
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") is not None:
        return "colab"
    return "local"


def competition_dir(explicit: str | Path | None = None, env: str | None = None) -> Path:
    """The folder holding train.csv / test.csv: ``explicit`` if given, else the platform's default.

    Raises ``FileNotFoundError`` naming the folder tried, and how to pass one, when none is found.
    """
    if explicit is not None:
        path = Path(explicit)
    elif (env or detect_env()) == "kaggle":
        path = KAGGLE_INPUT / COMPETITION
    else:
        raise FileNotFoundError("no data folder given: pass data_dir=… (or run `lmsys demo` to make one)")
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    return path


def runs_root(env: str | None = None) -> Path:
    """Where run folders live on this platform."""
    env = env or detect_env()
    if env == "kaggle":
        return KAGGLE_WORKING / "runs"
    if env == "colab":
        base = COLAB_DRIVE / "arena-distill" if COLAB_DRIVE.is_dir() else Path("/content")
        return base / "runs"
    return Path("runs")


def run_dir(name: str, root: str | Path | None = None) -> Path:
    """``<runs root>/<name>``, created."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"run name {name!r} must be a plain folder name")
    path = Path(root) if root is not None else runs_root()
    path = path / name
    path.mkdir(parents=True, exist_ok=True)
    return path
