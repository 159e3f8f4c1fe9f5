"""arena-distill's helper package for the LMSYS Chatbot Arena preference task.

Light modules (no torch): ``config``, ``parsing``, ``synthetic``, ``prompting``, ``metrics``, ``eda``,
``kaggle``, ``wheelhouse``. Import what you need from them; this package root re-exports the public API only.

The re-exports are resolved on first use (PEP 562), so ``from lmsys_lib import wheelhouse`` imports the standard
library and ``packaging`` only — a kernel's first cell checks the image before numpy or pandas are loaded
(they may be upgraded by the install that follows).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "config": ("DemoConfig", "FoldConfig", "PackConfig", "SynthConfig"),
    "metrics": ("UNIFORM_LOG_LOSS", "accuracy", "log_loss"),
    "parsing": ("AB_SWAP", "CLASSES", "MISSING_TURN", "NULL_TURN", "DataError", "read_competition", "read_extra",
                "swap_frame", "swap_labels", "swap_probs", "validate_file"),
    "prompting": ("Packed", "Packer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lmsys_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
