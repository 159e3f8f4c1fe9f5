"""The embedded default: exact dialect, determinism, real marginals and a learnable signal."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from lmsys_lib import parsing, synthetic
from lmsys_lib.config import SynthConfig


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    paths = synthetic.write(SynthConfig(n_train=4000, n_test=50, seed=11), out)
    return paths, parsing.read_competition(paths["train"]).frame


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = SynthConfig(n_train=200, n_test=30, seed=3)
    a, b = synthetic.write(cfg, tmp_path / "a"), synthetic.write(cfg, tmp_path / "b")
    assert all(_sha(a[k]) == _sha(b[k]) for k in a)
    c = synthetic.write(SynthConfig(n_train=200, n_test=30, seed=4), tmp_path / "c")
    assert _sha(a["train"]) != _sha(c["train"])


def test_exact_competition_dialect(synth_dir, real_sample):
    train = (synth_dir / "train.csv").read_bytes()
    assert b"\r" not in train and train.isascii()
    assert train.split(b"\n", 1)[0] == (real_sample / "train_head_100.csv").read_bytes().split(b"\n", 1)[0]
    test = (synth_dir / "test.csv").read_bytes()
    assert test.split(b"\n", 1)[0] == (real_sample / "test.csv").read_bytes().split(b"\n", 1)[0]
    sub = (synth_dir / "sample_submission.csv").read_text()
    real_sub = (real_sample / "sample_submission.csv").read_text()
    assert sub.splitlines()[0] == real_sub.splitlines()[0]
    assert sub.splitlines()[1].split(",", 1)[1] == real_sub.splitlines()[1].split(",", 1)[1]
    text = train.decode()
    assert '"",""' in text and '"", ""' not in text  # JSON lists without spaces, quotes doubled
    assert re.search(r"\\u[0-9a-f]{4}", text) and re.search(r"\\ud83[cdef]\\ud[c-f]", text)  # escapes, emoji
    assert "\\/" in text  # "/" written "\/" in some cells, as in the real file
    lines = text.split("\n")[1:4]
    assert all(re.match(r"^\d+,", line) for line in lines)
    assert re.search(r",[01],[01],[01]\n", text)


def test_files_validate_and_ids_are_int64_above_2_31(synth_dir):
    for name in ("train", "test", "sample_submission"):
        report = parsing.validate_file(synth_dir / f"{name}.csv", test_path=synth_dir / "test.csv")
        assert report.ok, report.render()
    frame = parsing.read_competition(synth_dir / "train.csv").frame
    ids = frame["id"].to_numpy()
    assert ids.dtype == np.int64 and (ids > 2**31).any() and (np.diff(ids) > 0).all()
    test = parsing.read_competition(synth_dir / "test.csv").frame
    assert not set(ids) & set(test["id"])


def test_real_marginals(big):
    _, frame = big
    share = np.bincount(frame["label"], minlength=3) / len(frame)
    assert np.allclose(share, [0.349, 0.342, 0.309], atol=0.03)
    assert 0.10 <= (frame["n_rounds"] > 1).mean() <= 0.16 and frame["n_rounds"].max() <= 15
    nulls = (frame["null_a"] | frame["null_b"]).mean()
    assert 0.001 <= nulls <= 0.008
    assert (frame["null_a"] & frame["null_b"] & frame["empty_a"] & frame["empty_b"]).any()  # both [null]
    lengths = frame["response_a"].map(lambda t: max(map(len, t)))
    assert 700 <= lengths.median() <= 1400 and lengths.max() >= 10_000
    text = "".join(t for col in ("prompt", "response_a") for turns in frame[col] for t in turns)
    for script, (_, bank) in synthetic._SCRIPTS.items():  # every script shows up
        assert bank is None or any(phrase in text for phrase in bank), script
    assert any(e in text for e in synthetic._EMOJI)
    assert frame["n_surrogates"].sum() >= 1  # rare lone surrogates, repaired by the reader


def test_learnable_signal(big):
    _, frame = big
    label = frame["label"].to_numpy()
    len_a = frame["response_a"].map(lambda t: sum(map(len, t))).to_numpy()
    len_b = frame["response_b"].map(lambda t: sum(map(len, t))).to_numpy()
    longer_a = len_a > 2 * len_b
    longer_b = len_b > 2 * len_a
    base_a, base_b = (label == 0).mean(), (label == 1).mean()  # ≈ 0.35 each
    assert (label[longer_a] == 0).mean() > base_a + 0.1 and (label[longer_b] == 1).mean() > base_b + 0.1
    refusal = frame["response_a"].map(lambda t: any(r in t[-1] for r in synthetic._REFUSALS)).to_numpy()
    assert refusal.sum() > 20 and (label[refusal] == 1).mean() > 0.7
    identical = frame["identical"].to_numpy()
    assert (label[identical] == 2).mean() > 0.7
    formatted = frame["response_a"].map(lambda t: t[-1].startswith("## ")).to_numpy()
    plain = ~formatted & ~refusal
    assert (label[formatted] == 0).mean() > (label[plain] == 0).mean() + 0.05


def test_label_model_is_a_distribution():
    for diff in (-5.0, 0.0, 3.0):
        p = synthetic.label_probs(diff)
        assert np.isclose(p.sum(), 1) and (p > 0).all()
    assert synthetic.label_probs(3.0)[0] > synthetic.label_probs(0.0)[0] > synthetic.label_probs(-3.0)[0]
    assert synthetic.label_probs(0.0, identical=True)[2] > 0.8


def test_cells_decode_to_aligned_turns(synth_dir):
    raw = parsing.read_table(synth_dir / "train.csv")
    for cell_p, cell_a in zip(raw["prompt"][:200], raw["response_a"][:200]):
        assert len(json.loads(cell_p)) == len(json.loads(cell_a))
