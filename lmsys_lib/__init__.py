"""arena-distill's helper package for the LMSYS Chatbot Arena preference task.

Light modules (no torch): ``config``, ``parsing``, ``synthetic``, ``prompting``, ``metrics``, ``eda``,
``kaggle``. Import what you need from them; this package root re-exports the public API only.
"""

from .config import DemoConfig, FoldConfig, PackConfig, SynthConfig
from .metrics import UNIFORM_LOG_LOSS, accuracy, log_loss
from .parsing import (
    AB_SWAP,
    CLASSES,
    MISSING_TURN,
    NULL_TURN,
    DataError,
    read_competition,
    read_extra,
    swap_frame,
    swap_labels,
    swap_probs,
    validate_file,
)
from .prompting import Packed, Packer

__version__ = "0.1.0"

__all__ = [
    "AB_SWAP", "CLASSES", "MISSING_TURN", "NULL_TURN", "UNIFORM_LOG_LOSS", "DataError", "DemoConfig",
    "FoldConfig", "PackConfig", "Packed", "Packer", "SynthConfig", "accuracy", "log_loss", "read_competition",
    "read_extra", "swap_frame", "swap_labels", "swap_probs", "validate_file", "__version__",
]
