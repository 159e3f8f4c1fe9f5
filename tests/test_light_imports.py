"""Light modules import without torch, so EDA and packaging work on a CPU box in seconds."""

from __future__ import annotations

import subprocess
import sys

LIGHT = ("config", "parsing", "prompting", "synthetic", "metrics", "eda", "kaggle", "zoo", "cli", "notebook", "quantize",
         "inference", "batching", "wheelhouse", "demo", "evaluate", "prepare", "contract", "recipe")


def test_light_modules_do_not_import_torch():
    code = ("import sys\n"
            + "".join(f"import lmsys_lib.{m}\n" for m in LIGHT)
            + "import lmsys_lib\n"
            + "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
            + "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_packing_with_a_tokenizer_still_does_not_import_torch(synth_dir):
    code = (
        "import sys\n"
        "from lmsys_lib import parsing, zoo\n"
        "from lmsys_lib.config import PackConfig\n"
        "from lmsys_lib.prompting import Packer\n"
        f"frame = parsing.read_competition({str(synth_dir / 'test.csv')!r}).frame\n"
        "tok = zoo.train_bpe_tokenizer(zoo.conversation_texts(frame), 600)\n"
        "Packer(tok, PackConfig(max_length=128)).pack_frame(frame)\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_image_check_loads_neither_numpy_nor_pandas():
    """A kernel's first cell imports `lmsys_lib.wheelhouse` before the install that may upgrade numpy: the package
    root resolves its re-exports lazily, so nothing of numpy or pandas is loaded yet."""
    code = ("import sys\nfrom lmsys_lib import wheelhouse\n"
            "assert not [m for m in ('numpy', 'pandas', 'torch') if m in sys.modules]\n"
            "import lmsys_lib\nassert lmsys_lib.log_loss([[1, 0, 0]], [[0.8, 0.1, 0.1]]) > 0\n"
            "from lmsys_lib import *\nassert callable(read_competition) and Packer\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
