"""The data layer on real rows, on hand-made broken files and on the extra data sets' formats."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmsys_lib import parsing as P

HEADER = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


# -- real rows ---------------------------------------------------------------------------------------


def test_real_train_rows_parse_exactly(real_sample):
    result = P.read_competition(real_sample / "train_head_100.csv")
    frame = result.frame
    assert len(frame) == 100 and result.kind == "train" and not result.fatal
    assert frame["id"].dtype == np.int64 and frame["id"].is_unique
    assert (frame["label"].isin([0, 1, 2])).all()
    raw = pd.read_csv(real_sample / "train_head_100.csv", dtype=str)
    onehot = raw[list(P.LABEL_COLUMNS)].astype(int).to_numpy()
    assert (onehot.argmax(axis=1) == frame["label"].to_numpy()).all()
    # turn i of the prompt is answered by turn i of both responses
    for _, row in frame.iterrows():
        assert len(row["prompt"]) == len(row["response_a"]) == len(row["response_b"]) == row["n_rounds"]
    assert frame["n_rounds"].max() == 10 and (frame["n_rounds"] > 1).sum() == 16


def test_real_rows_decode_escapes_and_emoji(real_sample):
    frame = P.read_competition(real_sample / "train_head_100.csv").frame
    text = "".join(t for col in P.TEXT_COLUMNS for turns in frame[col] for t in turns)
    assert "\U0001f34d" in text  # the file writes 🍍 as the surrogate pair \ud83c\udf4d
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    test = P.read_competition(real_sample / "test.csv").frame
    assert "he/him" in test.loc[1, "prompt"][0]  # written "he\/him" in the file


def test_real_files_validate(real_sample):
    for name in ("train_head_100.csv", "test.csv", "sample_submission.csv"):
        report = P.validate_file(real_sample / name, test_path=real_sample / "test.csv")
        assert report.ok, report.render()


# -- cells -------------------------------------------------------------------------------------------


def test_null_turn_becomes_marker_never_none():
    turns, n_null, _ = P.decode_cell('["hi",null]')
    assert turns == ["hi", P.NULL_TURN] and n_null == 1
    assert "None" not in P.NULL_TURN


def test_lone_surrogates_repaired_and_counted():
    turns, _, fixed = P.decode_cell('["a\\ud83d b","ok \\ud83d\\ude00"]')
    assert turns == ["a\ufffd b", "ok \U0001f600"] and fixed == 1
    turns[0].encode("utf-8")  # would raise on a lone surrogate


@pytest.mark.parametrize("cell, message", [
    ("not json", "not valid JSON"), ('{"a": 1}', "expected a list"), ("[1]", "turn 0 is int"),
    ("[]", "empty list"), ("null", "JSON NoneType"), ('[["nested"]]', "turn 0 is list"),
])
def test_bad_cells_raise(cell, message):
    with pytest.raises(P.CellError, match=message):
        P.decode_cell(cell)


def test_plain_string_cell_is_one_turn_verbatim():
    assert P.decode_cell("Just a question?", plain=True)[0] == ["Just a question?"]
    assert P.decode_cell('["apple", "banana"]', plain=True)[0] == ['["apple", "banana"]']


def test_encode_cell_is_the_competition_dialect():
    cell = P.encode_cell(["héllo 😀", None, 'say "x"'])
    assert cell == '["h\\u00e9llo \\ud83d\\ude00",null,"say \\"x\\""]'
    assert P.decode_cell(cell)[0] == ["héllo 😀", P.NULL_TURN, 'say "x"']


def test_unequal_turn_counts_are_padded_with_a_warning(tmp_path):
    path = _write(tmp_path, "t.csv", HEADER + '1,m1,m2,"[""a"",""b""]","[""x""]","[""y"",""z""]",1,0,0\n')
    result = P.read_competition(path)
    row = result.frame.iloc[0]
    assert row["response_a"] == ["x", P.MISSING_TURN] and row["n_rounds"] == 2
    assert any("turn counts differ" in p.message for p in result.warnings)


# -- broken files ------------------------------------------------------------------------------------


BROKEN = (HEADER
          + '1,m1,m2,"[""ok""]","[""a""]","[""b""]",1,0,0\n'
          + '2,m1,m2,[not json,"[""a""]","[""b""]",1,0,0\n'
          + '3,m1,m2,"[""ok""]","[""a""]","[""b""]",1,1,0\n'
          + '4,m1,m2,"[""ok""]","[""a""]","[""b""]",x,0,0\n'
          + '1,m1,m2,"[""dup""]","[""a""]","[""b""]",0,0,1\n')


def test_broken_file_names_every_bad_row(tmp_path):
    path = _write(tmp_path, "broken.csv", BROKEN)
    with pytest.raises(P.DataError) as info:
        P.read_competition(path)
    problems = info.value.problems
    assert {(p.row_id, p.field.split("/")[0]) for p in problems} == {
        (2, "prompt"), (3, "winner_model_a"), (4, "winner_model_a"), (1, "id")}
    assert sum(p.row_id == 1 for p in problems) == 2  # both rows that share id 1


def test_validate_cli_reports_rows_and_exits_nonzero(tmp_path):
    path = _write(tmp_path, "broken.csv", BROKEN)
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "validate", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in ("id=2 (record 2) field=prompt: not valid JSON", "id=3 (record 3)", "labels not one-hot",
                   "id=4 (record 4)", "duplicate id", "FAILED"):
        assert needle in proc.stdout


def test_validate_cli_missing_column_and_missing_file(tmp_path):
    path = _write(tmp_path, "nocol.csv", "id,prompt,response_a\n1,\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n")
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "validate", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "field=response_b: missing column" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "validate", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_train_file_missing_one_label_column_is_fatal(tmp_path):
    path = _write(tmp_path, "t.csv", HEADER.replace(",winner_tie", "")
                  + '1,m1,m2,"[""q""]","[""a""]","[""b""]",1,0\n')
    report = P.validate_file(path)
    assert not report.ok and "field=winner_tie: missing column" in report.render()
    sub = _write(tmp_path, "s.csv", "id,winner_model_a,winner_model_b\n1,0.5,0.5\n")
    assert "field=winner_tie: missing column" in P.validate_file(sub).render()


@pytest.mark.parametrize("name, content, message", [
    ("latin1.csv", HEADER.encode() + b'1,m\xe9,m2,"[""q""]","[""a""]","[""b""]",1,0,0\n', r"not UTF-8: byte 92 \(line 2\)"),
    ("empty.csv", b"", "empty file"),
    ("longrow.csv", HEADER.encode() + b'1,m1,m2,"[""q""]","[""a""]","[""b""]",1,0,0,extra\n', "malformed CSV"),
])
def test_unreadable_files_name_the_file_and_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        P.read_table(path)


def test_bom_header_only_and_gzip_files(tmp_path):
    row = '1,m1,m2,"[""q""]","[""a""]","[""b""]",1,0,0\n'
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (HEADER + row).encode())
    assert P.read_competition(tmp_path / "bom.csv").frame["id"].tolist() == [1]
    empty = P.read_competition(_write(tmp_path, "h.csv", HEADER)).frame
    assert len(empty) == 0 and {"prompt", "response_a", "label"} <= set(empty.columns)
    import gzip
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress((HEADER + row).encode()))
    assert P.read_competition(tmp_path / "t.csv.gz").frame["label"].tolist() == [0]


def test_ids_keep_their_text_when_not_plain_integers(tmp_path):
    path = _write(tmp_path, "t.csv", "id,prompt,response_a,response_b\n"
                  '007,"[""q""]","[""a""]","[""b""]"\n7,"[""q""]","[""a""]","[""b""]"\n')
    result = P.read_competition(path)
    assert result.frame["id"].tolist() == ["007", "7"] and not result.fatal


def test_validate_cli_checks_every_file_and_reports_unreadable_ones(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(HEADER.encode() + b'1,m\xe9,m2,"[""q""]","[""a""]","[""b""]",1,0,0\n')
    good = _write(tmp_path, "good.csv", HEADER + '1,m1,m2,"[""q""]","[""a""]","[""b""]",1,0,0\n')
    proc = subprocess.run([sys.executable, "-m", "lmsys_lib", "validate", str(bad), str(good)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "latin1.csv: cannot be read" in proc.stderr
    assert "good.csv: train, 1 rows — OK" in proc.stdout and "Traceback" not in proc.stderr


def test_bad_cell_fallback_keeps_every_row_for_inference(tmp_path):
    path = _write(tmp_path, "test.csv", "id,prompt,response_a,response_b\n"
                  '7,[oops,"[""a""]","[""b""]"\n8,"[""q""]","[""a""]","[""b""]"\n')
    result = P.read_competition(path, on_bad_cell="text")
    assert list(result.frame["id"]) == [7, 8] and result.frame.loc[0, "prompt"] == ["[oops"]
    assert not result.fatal and "kept as one text turn" in result.warnings[0].message


def test_submission_checks(tmp_path):
    good = pd.DataFrame({"id": [5, 6], "winner_model_a": [0.2, 0.5], "winner_model_b": [0.3, 0.25],
                         "winner_tie": [0.5, 0.25]})
    assert P.check_submission(good, test_ids=[5, 6]) == []
    bad = good.copy()
    bad.loc[0, "winner_tie"] = np.nan
    bad.loc[1, "winner_model_a"] = 0.9
    problems = P.check_submission(bad, test_ids=[6, 5])
    messages = " | ".join(str(p) for p in problems)
    assert "id=5" in messages and "non-finite" in messages
    assert "id=6" in messages and "sum to 1.4" in messages
    assert "ids differ from the test file" in messages


# -- labels, swap, folds, de-duplication --------------------------------------------------------------


def test_labels_and_the_swap_permutation():
    labels = np.array([0, 1, 2, -1])
    assert P.swap_labels(labels).tolist() == [1, 0, 2, -1]
    assert (P.swap_labels(P.swap_labels(labels)) == labels).all()
    onehot = P.labels_to_onehot(np.array([0, 1, 2]))
    assert (onehot == np.eye(3)).all()
    probs = np.array([[0.7, 0.2, 0.1]])
    assert P.swap_probs(probs).tolist() == [[0.2, 0.7, 0.1]]
    # the same permutation moves probabilities and labels: P(true class) is unchanged by a swap
    y = np.array([0])
    assert P.swap_probs(probs)[0, P.swap_labels(y)[0]] == probs[0, y[0]]


def test_swap_frame_exchanges_sides(synth_frame):
    swapped = P.swap_frame(synth_frame)
    assert (swapped["response_a"] == synth_frame["response_b"]).all()
    assert (swapped["model_b"] == synth_frame["model_a"]).all()
    assert (swapped["empty_a"] == synth_frame["empty_b"]).all()
    assert (swapped["label"].to_numpy() == P.swap_labels(synth_frame["label"].to_numpy())).all()
    assert (swapped["prompt"] == synth_frame["prompt"]).all()


def test_grouped_folds_keep_a_prompt_in_one_fold(synth_frame):
    frame = synth_frame.copy()
    # the same prompt written differently (case, whitespace) must land in one fold
    frame.at[5, "prompt"] = ["  HOW do I   fix pizza?"]
    frame.at[9, "prompt"] = ["how do i fix\npizza?"]
    folds = P.grouped_folds(frame, k=5, seed=1)
    assert folds[5] == folds[9]
    with pytest.raises(ValueError, match="cannot make 5 grouped folds from 2 distinct prompts"):
        P.grouped_folds(frame.iloc[[5, 9, 0]], k=5)
    keys = frame["prompt"].map(P.prompt_key)
    assert (pd.Series(folds).groupby(keys.to_numpy()).nunique() == 1).all()
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= pd.Series(keys).value_counts().max()
    assert (P.grouped_folds(frame, k=5, seed=1) == folds).all()
    assert not (P.grouped_folds(frame, k=5, seed=2) == folds).all()


def test_deduplicate_drops_exact_copies_and_swapped_copies():
    frame = pd.DataFrame({
        "prompt": [["Q"], ["Q"], ["Q"], ["other"], ["q "], ["a", "b c"], ["a b", "c"]],
        "response_a": [["x"], ["x"], ["y"], ["x"], ["x"], ["r", "r"], ["r", "r"]],
        "response_b": [["y"], ["y"], ["x"], ["y"], ["y"], ["s", "s"], ["s", "s"]],
        "label": np.array([0, 0, 0, 2, 0, 1, 1], dtype=np.int8),
    })
    kept, counts = P.deduplicate(frame)
    assert len(kept) == 5 and counts == {"dropped": 2, "label_conflicts": 1}
    # row 2 is row 0 swapped: its label 0 (A=y wins) contradicts row 0's A=x wins → a conflict;
    # "q " differs from "Q", and turns ["a","b c"] differ from ["a b","c"]: all kept


# -- extra data sets ---------------------------------------------------------------------------------


def test_33k_format_hex_ids_and_spaced_separators(tmp_path):
    path = _write(tmp_path, "33k.csv", HEADER
                  + '9f3b2c1d,m1,m2,"[""Hi"", ""again""]","[""a"", null]","[""b"", ""c""]",0,1,0\n'
                  + 'a0b1c2d3,m1,m2,"[""Yo""]","[""a""]","[""b""]",0,0,1\n')
    frame = P.read_extra(path).frame
    assert frame["id"].tolist() == ["9f3b2c1d", "a0b1c2d3"]
    assert frame.loc[0, "prompt"] == ["Hi", "again"] and frame.loc[0, "response_a"] == ["a", P.NULL_TURN]
    assert frame["label"].tolist() == [1, 2]


def test_ultrafeedback_plain_string_prompt(tmp_path):
    prompts = ["Plain question?", '["apple", "banana"]', "[3, 1, 2]"] + [f"Question {i}?" for i in range(5)]
    rows = pd.DataFrame({"id": [f"u{i + 1}" for i in range(8)], "model_a": "m", "model_b": "n",
                         "prompt": prompts, "response_a": ["Plain answer"] + ["x"] * 7,
                         "response_b": ['["listed"]'] + ["z"] * 7,
                         "winner_model_a": "1", "winner_model_b": "0", "winner_tie": "0"})
    path = tmp_path / "uf.csv"
    P.write_table(rows, path)
    frame = P.read_extra(path).frame
    assert frame.loc[0, "prompt"] == ["Plain question?"] and frame.loc[0, "response_b"] == ['["listed"]']
    assert frame.loc[1, "prompt"] == ['["apple", "banana"]'] and frame.loc[2, "prompt"] == ["[3, 1, 2]"]
    assert P.validate_file(path).ok


def test_ultrafeedback_bad_rows_are_named(tmp_path):
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    rows = pd.DataFrame({"prompt_id": ["p1", "p2", "p3"], "chosen": [good, "not json", good],
                         "rejected": [good, good, json.dumps([{"role": "user"}])],
                         "score_chosen": ["5", "5", ""], "score_rejected": ["1", "1", "1"]})
    path = tmp_path / "uf.csv"
    P.write_table(rows, path)
    report = P.validate_file(path)
    text = report.render()
    assert not report.ok and "id=p2 (record 2) field=chosen: not a JSON list" in text
    assert "id=p3 (record 3) field=rejected: message without a role" in text
    with pytest.raises(P.DataError, match="p2"):
        P.read_extra(path)


def test_ultrafeedback_chosen_rejected_ratings(tmp_path):
    def msgs(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    n = 40
    rows = pd.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)],
        "chosen": [json.dumps(msgs(f"q{i}", f"good{i}")) for i in range(n)],
        "rejected": [json.dumps(msgs(f"q{i}", f"bad{i}")) for i in range(n)],
        "score_chosen": [8.0] * (n - 4) + [5.0] * 4,
        "score_rejected": [3.0] * (n - 4) + [5.0] * 4,
    })
    path = tmp_path / "uf.parquet"
    rows.to_parquet(path)
    frame = P.read_extra(path, seed=3).frame
    assert frame["label"].tolist()[-4:] == [2, 2, 2, 2]  # equal ratings are ties
    decided = frame.iloc[: n - 4]
    winner = np.where(decided["label"] == 0, decided["response_a"], decided["response_b"])
    assert all(w[0].startswith("good") for w in winner)
    assert 0 < (decided["label"] == 0).mean() < 1  # chosen is not always on the same side
    assert (P.read_extra(path, seed=3).frame["label"] == frame["label"]).all()


def test_parquet_with_list_cells(tmp_path, synth_frame):
    raw = pd.DataFrame({"id": synth_frame["id"], "prompt": synth_frame["prompt"],
                        "response_a": synth_frame["response_a"], "response_b": synth_frame["response_b"]})
    raw.to_parquet(tmp_path / "test.parquet")
    frame = P.read_competition(tmp_path / "test.parquet").frame
    assert frame["prompt"].tolist() == synth_frame["prompt"].tolist()
    assert (frame["id"] == synth_frame["id"]).all()
