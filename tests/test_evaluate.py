"""Segment report invariants, temperature recovery, ensemble weights, calibration plot, OOF join."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmsys_lib import evaluate, parsing
from lmsys_lib import evaluate as ev
from lmsys_lib.metrics import log_loss, row_log_loss, softmax


def _frame(rows: list[dict]) -> pd.DataFrame:
    """A conversation frame from compact rows: prompt/a/b turn lists, winner 0/1/2, models."""
    raw = pd.DataFrame({
        "id": [str(1000 + i) for i in range(len(rows))],
        "model_a": [r.get("ma", "gpt-4-0613") for r in rows],
        "model_b": [r.get("mb", "claude-2.1") for r in rows],
        "prompt": [parsing.encode_cell(r.get("p", ["hi"])) for r in rows],
        "response_a": [parsing.encode_cell(r.get("a", ["x"])) for r in rows],
        "response_b": [parsing.encode_cell(r.get("b", ["y"])) for r in rows],
        **{col: [str(int(r.get("y", 0) == k)) for r in rows] for k, col in enumerate(parsing.LABEL_COLUMNS)},
    })
    result = parsing.parse_frame(raw, "train")
    assert not result.fatal
    return result.frame


def _mixed_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    models = ["gpt-4-0613", "gpt-3.5-turbo-0613", "claude-2.1", "llama-2-70b-chat", "mixtral-8x7b", "vicuna-13b"]
    rows = []
    for i in range(n):
        k = int(rng.integers(1, 8))
        a = ["a" * int(rng.integers(0, 3000))] * k
        b = [None] * k if i % 17 == 0 else ["b" * int(rng.integers(0, 3000))] * k
        rows.append({"p": ["q" * int(rng.integers(1, 500))] * k, "a": a, "b": a if i % 11 == 0 else b,
                     "y": int(rng.integers(0, 3)), "ma": models[i % 6], "mb": models[(i * 5 + 1) % 6]})
    return _frame(rows)


def _dirichlet(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(3), size=n)


# -- segments ----------------------------------------------------------------------------------------


def test_segments_cover_every_row_with_declared_vocabulary():
    frame = _mixed_frame()
    seg = ev.segments(frame)
    assert seg.index.equals(frame.index)
    assert list(seg.columns) == ["length", "turns", "label", "empty", "identical", "len_diff", "model_pair",
                                 "model_family"]
    assert not seg.isna().any().any()
    assert set(seg["length"].cat.categories) == set(ev.CHAR_NAMES)  # no token counts: characters, named so
    assert (seg["identical"] == "identical").sum() == frame["identical"].sum()
    assert set(seg["model_family"].cat.categories) <= {
        f"{x} vs {y}" for x in ev.FAMILIES for y in ev.FAMILIES if x <= y}


def test_bucket_thresholds():
    n_tokens = [0, 255, 256, 511, 512, 1023, 1024, 2047, 2048, 9000]
    frame = _frame([{"p": ["p"] * t, "a": ["a"] * t, "b": ["b"] * t} for t in (1, 2, 3, 5, 6, 9, 1, 1, 1, 1)])
    seg = ev.segments(frame, n_tokens=n_tokens)
    assert seg["length"].tolist() == [ev.TOKEN_NAMES[i] for i in (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)]
    assert seg["turns"].tolist()[:6] == [ev.TURN_NAMES[i] for i in (0, 1, 2, 2, 3, 3)]
    diffs = (-1001, -1000, -101, -100, 0, 100, 101, 1000, 1001)
    frame = _frame([{"a": ["a" * (2000 - min(d, 0))], "b": ["b" * (2000 + max(d, 0))]} for d in diffs])
    assert ev.segments(frame)["len_diff"].tolist() == [ev.LEN_DIFF_NAMES[i] for i in (0, 1, 1, 2, 2, 2, 3, 3, 4)]


def test_model_pair_is_order_free_and_families_follow_the_prefix_map():
    frame = _frame([{"ma": "gpt-4-0613", "mb": "claude-1"}, {"ma": "claude-1", "mb": "gpt-4-0613"},
                    {"ma": "Mixtral-8x7b", "mb": "gemma-7b-it"}, {"ma": "vicuna-13b", "mb": "qwen-14b-chat"}])
    seg = ev.segments(frame)
    assert seg["model_pair"][0] == seg["model_pair"][1] == "claude-1 vs gpt-4-0613"
    assert seg["model_family"].tolist() == ["claude vs gpt-4", "claude vs gpt-4", "gemini/gemma vs mistral/mixtral",
                                            "other vs qwen"]
    assert [ev.model_family(m) for m in ("gpt-3.5-turbo", "llama-2-7b-chat", "codellama-34b")] == \
        ["gpt-3.5", "llama", "other"]


def test_empty_segment_and_truncation_from_max_length():
    frame = _frame([{"a": [""], "b": ["x"]}, {"a": ["x"], "b": [None]}, {"a": [" "], "b": [""]}, {}])
    seg = ev.segments(frame, n_tokens=[100, 3000, 900, 1025], max_length=1024)
    assert seg["empty"].tolist() == ["A empty/null", "B empty/null", "both empty/null", "none"]
    assert seg["truncated"].tolist() == ["not cut at 1024 tokens", "cut at 1024 tokens", "not cut at 1024 tokens",
                                         "cut at 1024 tokens"]
    given = ev.segments(frame, n_tokens=[100, 1024, 900, 1024], truncated=[False, True, False, False])
    assert given["truncated"].tolist() == ["not cut", "cut", "not cut", "not cut"]


# -- segment report ----------------------------------------------------------------------------------


@pytest.mark.parametrize("min_rows", [0, 1, 5])
def test_report_rows_and_total_loss_add_up_in_every_dimension(min_rows):
    frame, probs = _mixed_frame(80), _dirichlet(80)
    losses = row_log_loss(frame["label"].to_numpy(), probs)
    report = ev.segment_report(frame, probs, n_tokens=np.arange(80) * 40, truncated=np.arange(80) % 3 == 0,
                               min_rows=min_rows)
    assert list(report.columns) == list(ev.REPORT_COLUMNS)
    sums = report.groupby("dimension")[["rows", "total_loss", "row_share", "loss_share", "excess_loss"]].sum()
    assert len(sums) == 9 and (sums["rows"] == len(frame)).all()
    assert np.allclose(sums["total_loss"], losses.sum(), rtol=1e-12)
    assert np.allclose(sums[["row_share", "loss_share"]], 1.0) and np.allclose(sums["excess_loss"], 0, atol=1e-9)
    assert report.attrs["rows"] == 80 and np.isclose(report.attrs["log_loss"], losses.mean())
    used = report[report["rows"] > 0]
    assert (used["rows"] >= min_rows).all() or used["segment"].str.startswith("(other").any()
    for _, part in report.groupby("dimension", sort=False):  # biggest contributor first in each dimension
        assert (np.diff(part["total_loss"].to_numpy()) <= 0).all()


def test_top_segments_rank_across_dimensions():
    frame, probs = _mixed_frame(80), _dirichlet(80, seed=1)
    report = ev.segment_report(frame, probs)
    top = ev.top_segments(report, 5)
    assert len(top) == 5 and (np.diff(top["excess_loss"].to_numpy()) <= 0).all()
    assert top["excess_loss"].iloc[0] == report["excess_loss"].max()


def test_zero_row_segments_are_omitted_by_default_and_listed_with_min_rows_0():
    frame = _mixed_frame(30)
    frame = frame.assign(empty_a=False, empty_b=False, null_a=False, null_b=False)
    probs = _dirichlet(30)
    default = ev.segment_report(frame, probs)
    assert (default["rows"] > 0).all()
    assert default.loc[default["dimension"] == "empty", "segment"].tolist() == ["none"]
    full = ev.segment_report(frame, probs, min_rows=0)
    empty = full[(full["dimension"] == "empty") & (full["rows"] == 0)]
    assert sorted(empty["segment"]) == sorted(ev.EMPTY_NAMES[1:])
    assert empty["log_loss"].isna().all() and empty["accuracy"].isna().all() and (empty["total_loss"] == 0).all()
    assert "A empty/null" in ev.report_markdown(full, "all segments", top=len(full))


def test_unlabelled_rows_are_refused():
    frame = _mixed_frame(20)
    frame.loc[[3, 7], "label"] = -1
    with pytest.raises(ValueError, match="2 of 20 rows are unlabelled"):
        ev.segment_report(frame, _dirichlet(20))


def test_bad_probabilities_name_the_row_id():
    frame = _mixed_frame(20)
    probs = _dirichlet(20)
    bad = probs.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite: ids \[1004\]"):
        ev.segment_report(frame, bad)
    bad = probs.copy()
    bad[9] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"not summing to 1 .*ids \[1009\]"):
        ev.segment_report(frame, bad)
    with pytest.raises(ValueError, match=r"shape \(20, 3\)"):
        ev.segment_report(frame, probs[:19])


def test_report_on_real_sample_rows_renders(real_sample):
    frame = parsing.read_competition(real_sample / "train_head_100.csv").frame
    report = ev.segment_report(frame, _dirichlet(len(frame), seed=3), min_rows=3)
    sums = report.groupby("dimension")["rows"].sum()
    assert (sums == len(frame)).all() and {"model_pair", "model_family"} <= set(sums.index)
    text = ev.report_markdown(report, "random Dirichlet on the real sample", top=10)
    lines = text.strip().splitlines()
    assert lines[0] == "## random Dirichlet on the real sample"
    assert len([line for line in lines if line.startswith("| ")]) == 11  # header + 10 rows
    assert "log loss" in text


# -- temperature -------------------------------------------------------------------------------------


def _miscalibrated(n: int = 20000, scale: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the model reports scale · z (over-confident for scale > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 3))
    p = softmax(z)
    labels = (rng.random(n)[:, None] > p.cumsum(axis=1)).sum(axis=1)
    return scale * z, labels


def test_fit_temperature_recovers_a_known_scaling():
    logits, labels = _miscalibrated()
    t = ev.fit_temperature(logits, labels)
    assert abs(t / 2.0 - 1) < 0.05
    assert ev.fit_temperature(logits, labels) == t  # deterministic
    before, after = log_loss(labels, softmax(logits)), log_loss(labels, ev.apply_temperature(logits, t))
    assert after < before - 0.02
    assert ev.fit_temperature(logits, labels, bounds=(0.1, 1.0)) == pytest.approx(1.0, abs=1e-6)  # bound hit


def test_temperature_file_round_trip(tmp_path):
    logits, labels = _miscalibrated(2000)
    assert ev.load_temperature(tmp_path) is None
    t = ev.fit_temperature(logits, labels)
    report = ev.temperature_report(logits, labels, t, source="oof.parquet")
    assert report["log_loss_after"] < report["log_loss_before"] and report["rows"] == 2000
    path = ev.save_temperature(tmp_path, t, report)
    assert path.name == ev.TEMPERATURE_FILE and ev.load_temperature(tmp_path) == pytest.approx(t)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ev.save_temperature(tmp_path, 1.5, report)
    ev.save_temperature(tmp_path, 1.5, report, overwrite=True)
    assert ev.load_temperature(tmp_path) == 1.5
    with pytest.raises(ValueError, match="positive"):
        ev.apply_temperature(logits, 0.0)


# -- ensemble ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["log", "prob"])
def test_ensemble_gives_a_noise_member_no_weight(space):
    rng = np.random.default_rng(50)  # not the seed of z
    z, labels = _miscalibrated(5000, scale=1.0, seed=5)
    views = [z + rng.normal(0, 1.2, z.shape), z + rng.normal(0, 1.2, z.shape)]  # two independent noisy models
    members = [softmax(v, ev.fit_temperature(v, labels)) for v in views]  # calibrated first, as documented
    members.append(rng.dirichlet(np.ones(3), size=len(z)))  # pure noise
    weights, info = ev.fit_ensemble_weights(members, labels, space=space)
    assert weights.shape == (3,) and (weights >= 0).all() and np.isclose(weights.sum(), 1.0)
    assert weights[2] < 0.05 and info["space"] == space and info["rule"] == ev.BLEND_RULES[space]
    assert info["log_loss"] <= min(info["member_log_loss"]) + 1e-12
    assert info["log_loss"] < min(info["member_log_loss"][:2]) - 0.005  # two noisy views beat either
    assert np.isclose(info["log_loss"], log_loss(labels, ev.blend(members, weights, space)))
    again, _ = ev.fit_ensemble_weights(members, labels, space=space)
    assert np.array_equal(weights, again)


@pytest.mark.parametrize("space", ["log", "prob"])
def test_ensemble_weights_match_a_brute_force_simplex_grid(space):
    rng = np.random.default_rng(8)
    z, labels = _miscalibrated(1000, scale=1.0, seed=9)
    members = [softmax(s * z + rng.normal(0, 1.0, z.shape)) for s in (0.6, 1.0, 1.6)]  # mis-scaled on purpose
    weights, info = ev.fit_ensemble_weights(members, labels, space=space)
    grid = [(a / 50, b / 50, 1 - (a + b) / 50) for a in range(51) for b in range(51 - a)]
    best = min(log_loss(labels, ev.blend(members, w, space)) for w in grid)
    assert info["log_loss"] <= best + 1e-9
    one, info1 = ev.fit_ensemble_weights(members[:1], labels, space=space)
    assert one.tolist() == [1.0] and info1["log_loss"] == info1["member_log_loss"][0]


def test_log_blend_equals_averaging_logits():
    rng = np.random.default_rng(2)
    za, zb = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    blended = ev.blend([softmax(za), softmax(zb)], [0.3, 0.7], "log")
    assert np.allclose(blended, softmax(0.3 * za + 0.7 * zb))
    with pytest.raises(ValueError, match="space must be one of"):
        ev.blend([softmax(za)], [1.0], "rank")


# -- calibration -------------------------------------------------------------------------------------


def test_calibration_table_and_reliability_png(tmp_path):
    z, labels = _miscalibrated(3000, scale=1.0, seed=1)
    probs = softmax(z)
    table = ev.calibration_table(probs, labels, n_bins=10)
    assert (table.groupby("class")["rows"].sum() == 3000).all() and len(table) == 30
    calibrated = ev.expected_calibration_error(table)
    over = ev.expected_calibration_error(ev.calibration_table(softmax(3 * z), labels, 10))
    assert all(calibrated[c] < 0.05 < over[c] for c in parsing.CLASSES)
    path = ev.reliability_diagram(probs, labels, tmp_path / "plots" / "reliability.png")
    assert path.exists() and path.stat().st_size > 5_000 and path.read_bytes()[:4] == b"\x89PNG"


# -- OOF join ----------------------------------------------------------------------------------------


def _oof_for(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(frame), 3))
    oof = pd.DataFrame({"id": frame["id"].to_numpy(), "fold": np.arange(len(frame)) % 3,
                        **dict(zip(ev.LOGIT_COLUMNS, logits.T)), "teacher": "t1"})
    return oof.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # any order


def test_oof_frame_aligns_logits_by_id(tmp_path):
    frame = _mixed_frame(25)
    oof = _oof_for(frame)
    path = tmp_path / "oof.parquet"
    oof.to_parquet(path)
    joined, logits = ev.oof_frame(path, frame)
    assert joined["id"].tolist() == frame["id"].tolist() and logits.shape == (25, 3)
    expected = oof.set_index("id").loc[frame["id"], list(ev.LOGIT_COLUMNS)].to_numpy()
    assert np.array_equal(logits, expected) and "fold" in joined.columns


def test_oof_frame_names_missing_ids_on_either_side():
    frame = _mixed_frame(25)
    oof = _oof_for(frame)
    with pytest.raises(ValueError, match=r"1 data ids missing from the OOF logits \(e\.g\. \[1003\]\)"):
        ev.oof_frame(oof[oof["id"] != 1003], frame)
    with pytest.raises(ValueError, match=r"2 OOF ids not in the data \(e\.g\. \[1000, 1001\]\)"):
        ev.oof_frame(oof, frame.iloc[2:])
    two = pd.concat([oof, oof.assign(teacher="t2")])
    with pytest.raises(ValueError, match="pass teacher="):
        ev.oof_frame(two, frame)
    assert ev.oof_frame(two, frame, teacher="t2")[1].shape == (25, 3)


# -- stage reports, the command, the temperature's way to the submission -------------------------------------


def _oof_folder(tmp_path, frame, scale=2.0, seed=0):
    """An oof.parquet whose logits are the truth's, over-confident by ``scale``."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 1, (len(frame), 3))
    truth[np.arange(len(frame)), frame["label"].to_numpy()] += 1.0
    logits = truth * scale
    folder = tmp_path / "student" / "s"
    folder.mkdir(parents=True)
    pd.DataFrame({"id": frame["id"], "fold": 0, "logit_a": logits[:, 0], "logit_b": logits[:, 1],
                  "logit_tie": logits[:, 2], "teacher": "s"}).to_parquet(folder / "oof.parquet")
    return folder


def test_oof_report_writes_the_section_fits_and_saves_the_temperature(tmp_path, synth_frame):
    folder = _oof_folder(tmp_path, synth_frame)
    result = evaluate.oof_report(folder, synth_frame, "student s (out of fold)")
    text = (folder / "evaluation.md").read_text()
    assert "## student s (out of fold)" in text and "temperature fitted" in text and "plots/reliability.png" in text
    assert (folder / "plots" / "reliability.png").stat().st_size > 5_000
    assert result["temperature"] == evaluate.load_temperature(folder) and result["temperature"] > 1.2
    segments = pd.read_csv(folder / "segments.csv")
    assert segments.groupby("dimension")["rows"].sum().eq(len(synth_frame)).all()
    run = evaluate.run_report(tmp_path)  # the run folder's report.md links the plot from the run's root
    assert "](student/s/plots/reliability.png)" in run.read_text()


def test_a_dry_run_oof_covers_a_share_of_the_rows(tmp_path, synth_frame):
    folder = _oof_folder(tmp_path, synth_frame.iloc[:100])
    assert evaluate.oof_report(folder, synth_frame, "share", fit=False)["report"].attrs["rows"] == 100


def test_lmsys_evaluate_prints_the_report(tmp_path, synth_dir, synth_frame):
    import subprocess
    import sys

    folder = _oof_folder(tmp_path, synth_frame)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "evaluate", "--pred", str(folder / "oof.parquet"),
                           "--data", str(synth_dir / "train.csv"), "--top", "5", "--out", str(tmp_path / "ev")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "log loss" in proc.stdout and "excess_loss" in proc.stdout and "temperature T =" in proc.stdout
    assert (tmp_path / "ev" / "evaluation.md").exists()
    sub = tmp_path / "sub.csv"  # a submission-style file (probabilities) is read too
    pd.DataFrame({"id": synth_frame["id"], "winner_model_a": 0.4, "winner_model_b": 0.4, "winner_tie": 0.2}).to_csv(sub)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "evaluate", "--pred", str(sub), "--data",
                           str(synth_dir / "train.csv")], capture_output=True, text=True)
    assert proc.returncode == 0 and "temperature" not in proc.stdout, proc.stderr
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": [1], "x": [0]}).to_csv(bad)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "evaluate", "--pred", str(bad), "--data",
                           str(synth_dir / "train.csv")], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs id +" in proc.stderr


def test_rows_for_keeps_the_order_and_names_missing_ids(synth_frame):
    ids = synth_frame["id"].tolist()[::-1][:5]
    assert evaluate.rows_for(synth_frame, ids)["id"].tolist() == ids
    with pytest.raises(ValueError, match="not in the data"):
        evaluate.rows_for(synth_frame, [-1])
