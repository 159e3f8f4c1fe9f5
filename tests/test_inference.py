"""The inference kernel on CPU with a tiny real-architecture classifier: order, TTA mirror, resume,
deadline guard, NaN and OOM handling, awkward rows, rule priors, the `lmsys predict` command."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys_lib import batching, inference, modeling, parsing
from lmsys_lib.config import InferenceConfig, PackConfig

CFG = InferenceConfig(pack=PackConfig(max_length=128), token_budget=1024, max_batch_rows=16, degrade_max_length=96,
                      checkpoint_every=20, rule_priors=False)  # rules have their own tests


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer):
    """A tiny 4-layer Llama classifier with a head of std 0.5: its probabilities vary from row to row (row std
    ≈ 0.2; with 2 layers the last token barely sees the content and every row looks alike)."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("infer")
    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), out / "base", layers=4)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(out / "cls")
    modeling.load_tokenizer(base).save_pretrained(out / "cls")
    return out / "cls"


@pytest.fixture()
def loaded(classifier):
    models, tok, _ = inference.load_models(classifier, inference.devices_for("cpu"), log=lambda _: None)
    return models[0], tok


def _predict(model, tok, frame, cfg=CFG, **kw):
    kw.setdefault("log", lambda _: None)
    return inference.score(model, tok, frame, cfg, progress=False, **kw)


def test_token_budget_batches_cover_every_row_once_within_budget():
    lengths = np.random.default_rng(0).integers(5, 300, size=500)
    batches = batching.token_budget_batches(lengths, 1024, max_rows=16)
    rows = sorted(r for b in batches for r in b)
    assert rows == list(range(500))
    for b in batches:
        assert len(b) <= 16 and (len(b) == 1 or len(b) * lengths[b].max() <= 1024)
    longest = [lengths[b].max() for b in batches]
    assert longest == sorted(longest, reverse=True)  # longest first: OOM shows up at the start
    assert batching.pad_waste(lengths, batches) < 0.05


def test_output_follows_input_order_for_shuffled_rows(loaded, synth_frame):
    model, tok = loaded
    frame = synth_frame.iloc[:80]
    probs, report = _predict(model, tok, frame)
    shuffled = frame.sample(frac=1.0, random_state=1)
    again, _ = _predict(model, tok, shuffled)
    by_id = dict(zip(frame["id"], probs))
    np.testing.assert_allclose(again, np.array([by_id[i] for i in shuffled["id"]]), atol=1e-5)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1) and report["sources"] == {"model": 80}
    assert probs.std(axis=0).max() > 0.05  # rows differ: an order mistake would show


def test_swap_tta_gives_exactly_mirrored_probabilities(loaded, synth_frame):
    model, tok = loaded
    frame = synth_frame.iloc[:60]
    probs, _ = _predict(model, tok, frame)
    mirrored, _ = _predict(model, tok, parsing.swap_frame(frame))
    assert np.array_equal(mirrored, parsing.swap_probs(probs))  # bit for bit
    plain, _ = _predict(model, tok, frame, InferenceConfig(**{**CFG.__dict__, "tta": False}))
    assert not np.allclose(plain, probs)  # TTA does change the numbers of an asymmetric model


class _Interrupt:
    """Raises KeyboardInterrupt (a user stopping the kernel) on the n-th forward call."""

    def __init__(self, model, n):
        self.calls, self.n = 0, n
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_killed_run_resumes_to_the_identical_file(loaded, synth_frame, tmp_path, tokenizer):
    """Killed in pass 1 (the 9th forward) or in the swapped pass (the 22nd): the resumed run writes the same file
    as an uninterrupted one, and no row of either pass is lost or scored twice."""
    model, tok = loaded
    frame = synth_frame.iloc[:120]
    probs, first = _predict(model, tok, frame)
    whole = inference.write_submission(frame["id"], probs, tmp_path / "whole.csv")
    for kill in (9, 22):
        work = tmp_path / f"work{kill}"
        stop = _Interrupt(model, kill)
        with pytest.raises(KeyboardInterrupt):
            _predict(model, tok, frame, work_dir=work)
        stop.handle.remove()
        parts = pd.concat(pd.read_parquet(p) for p in (work / "predictions").glob("part-*.parquet"))
        assert 0 < len(parts) < 240 and (kill < 15) == (set(parts["pass"]) == {"plain"})
        resumed, report = _predict(model, tok, frame, work_dir=work)
        again = inference.write_submission(frame["id"], resumed, tmp_path / f"resumed{kill}.csv")
        assert whole.read_bytes() == again.read_bytes()
        assert report["sources"] == {"model": 120}
        parts = pd.concat(pd.read_parquet(p) for p in (work / "predictions").glob("part-*.parquet"))
        for which in ("plain", "swap"):  # no row lost or duplicated, in either pass
            assert sorted(parts.loc[parts["pass"] == which, "position"]) == list(range(120)), which
    work = tmp_path / "work9"
    with pytest.raises(ValueError, match="another model, other rows or other settings"):
        _predict(model, tok, synth_frame.iloc[:50], work_dir=work)
    other, _, _ = inference.load_models(_other_model(tmp_path, tokenizer), inference.devices_for("cpu"), log=lambda _: None)
    with pytest.raises(ValueError, match="another model"):  # never another model's predictions
        _predict(other[0], tok, frame, work_dir=work)
    longer = InferenceConfig(**{**CFG.__dict__, "time_budget_s": 3600.0, "checkpoint_every": 7})
    resumed_again, _ = _predict(model, tok, frame, longer, work_dir=work)  # budget may change
    assert np.array_equal(resumed_again, resumed)


def _other_model(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "ob", layers=4, seed=9)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).save_pretrained(tmp_path / "other")
    modeling.load_tokenizer(base).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def _fake_clock(step):
    ticks = itertools.count()
    return lambda: next(ticks) * step


class _CostClock:
    """A fake clock that each forward moves on by a·n·L + b·n·L² + c "seconds" (n rows padded to L tokens):
    batch times that grow with the square of the length, as attention's do."""

    def __init__(self, model, a=1e-3, b=2e-5, c=0.05):
        self.a, self.b, self.c, self.now = a, b, c, 0.0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        n, length = kwargs["input_ids"].shape
        self.now += self.a * n * length + self.b * n * length ** 2 + self.c

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _timed(model, tok, frame, cfg):
    """Probabilities, report and fake seconds of a run with all the time it needs."""
    with _CostClock(model) as clock:
        probs, report = _predict(model, tok, frame, dataclasses.replace(cfg, time_budget_s=1e9), clock=lambda: clock.now)
    return probs, report, clock.now


@pytest.mark.parametrize("rank", ["entropy", "margin"])
def test_anytime_tta_spends_the_time_left_on_the_most_uncertain_rows(loaded, synth_frame, rank):
    model, tok = loaded
    frame = synth_frame.iloc[:150]
    cfg = dataclasses.replace(CFG, token_budget=512, tta_rank=rank)
    one, _, pass1 = _timed(model, tok, frame, dataclasses.replace(cfg, tta=False))
    full, report, both = _timed(model, tok, frame, cfg)
    assert report["sources"] == {"model": 150} and report["tta_share"] == 1.0 and report["steps"] == []
    assert both == pytest.approx(2 * pass1)  # the swapped pass: the same batches again
    with _CostClock(model) as clock:
        probs, report = _predict(model, tok, frame, dataclasses.replace(cfg, time_budget_s=1.5 * pass1),
                                 clock=lambda: clock.now)
    assert clock.now <= 1.5 * pass1 and report["steps"] == ["no-tta"]
    assert set(report["sources"]) == {"model", "model:no-tta"} and 0.3 < report["tta_share"] < 0.7
    # each row: both passes (its swapped batch has other rows than under full TTA: equal to float rounding),
    # or pass 1 alone (the same batch: bit for bit)
    tta = np.array([np.allclose(p, f, rtol=0, atol=1e-6) for p, f in zip(probs, full)])
    single = np.array([np.array_equal(p, o) for p, o in zip(probs, one)])
    assert (tta ^ single).all() and tta.sum() == report["tta_rows"] == report["sources"]["model"]
    unsure = inference.uncertainty(one, rank)
    assert unsure[tta].min() >= unsure[~tta].max()  # exactly the most uncertain rows got the second pass


def test_the_deadline_shortens_only_the_rows_that_do_not_fit(loaded, synth_frame, tmp_path):
    model, tok = loaded
    frame = synth_frame.iloc[:150]
    cfg = dataclasses.replace(CFG, token_budget=512, tta=False)
    _, _, pass1 = _timed(model, tok, frame, cfg)
    said = []
    with _CostClock(model) as clock:
        probs, report = _predict(model, tok, frame, dataclasses.replace(cfg, time_budget_s=0.9 * pass1),
                                 clock=lambda: clock.now, log=said.append)
    assert report["steps"] == ["short"] and clock.now <= 0.9 * pass1, said
    sources = report["sources"]
    assert set(sources) == {"model:no-tta", "model:no-tta:len96"}, sources  # nobody gets the prior …
    assert 0 < sources["model:no-tta:len96"] < 75  # … and only some rows are cut
    with _CostClock(model) as clock:  # not even every row short fits: the shortest go first, the rest the prior
        probs, report = _predict(model, tok, frame, dataclasses.replace(cfg, time_budget_s=0.3 * pass1),
                                 clock=lambda: clock.now, log=said.append)
    assert report["steps"] == ["short", "prior"] and clock.now <= 0.3 * pass1
    assert {"model:no-tta", "model:no-tta:len96", "prior:deadline"} <= set(report["sources"])
    assert sum(report["sources"].values()) == 150
    path = inference.write_submission(frame["id"], probs, tmp_path / "submission.csv")
    assert parsing.check_submission(pd.read_csv(path), frame["id"].tolist()) == []
    assert any("re-packed at max_length 96" in s for s in said)


def test_a_run_killed_after_a_deadline_re_pack_resumes_without_scoring_a_row_twice(loaded, synth_frame, tmp_path):
    model, tok = loaded
    frame = synth_frame.iloc[:150]
    cfg = dataclasses.replace(CFG, token_budget=512, tta=False, checkpoint_every=1)
    _, _, pass1 = _timed(model, tok, frame, cfg)
    cfg = dataclasses.replace(cfg, time_budget_s=0.9 * pass1)
    work = tmp_path / "work"
    with _CostClock(model) as clock:
        stop = _Interrupt(model, 12)
        with pytest.raises(KeyboardInterrupt):
            _predict(model, tok, frame, cfg, work_dir=work, clock=lambda: clock.now)
        stop.handle.remove()
    short = json.loads((work / "predictions" / "short_plan.json").read_text())["rows"]
    assert short and (work / "predictions" / "guard.json").exists()
    with _CostClock(model) as clock:  # a new session, a new budget
        probs, report = _predict(model, tok, frame, cfg, work_dir=work, clock=lambda: clock.now)
    parts = pd.concat(pd.read_parquet(p) for p in (work / "predictions").glob("part-*.parquet"))
    assert parts["position"].is_unique  # no row scored twice
    assert set(parts["position"]) | {i for i, s in enumerate(report["row_sources"]) if s.startswith("prior")} \
        == set(range(150))  # none lost
    assert all(report["row_sources"][r] == "model:no-tta:len96" for r in short)  # the re-packed rows stay short
    path = inference.write_submission(frame["id"], probs, tmp_path / "s.csv")
    assert parsing.check_submission(pd.read_csv(path), frame["id"].tolist()) == []


def test_a_swapped_row_that_fails_keeps_its_one_pass_and_is_not_retried(loaded, synth_frame, tmp_path):
    model, tok = loaded
    frame = synth_frame.iloc[:20]
    cfg = dataclasses.replace(CFG, token_budget=100000, max_batch_rows=64)  # one batch a pass
    calls = {"n": 0}

    def nan_in_pass_two(module, args, output):  # the swapped pass and its fp32 recompute of each row fail
        calls["n"] += 1
        if calls["n"] >= 2:
            output.logits = torch.full_like(output.logits, float("nan"))
        return output

    handle = model.register_forward_hook(nan_in_pass_two)
    probs, report = _predict(model, tok, frame, cfg, work_dir=tmp_path / "w")
    handle.remove()
    assert report["sources"] == {"model:no-tta": 20} and np.isfinite(probs).all()
    calls["n"] = -10**9  # resumed: nothing to score again (a forward would be counted)
    counted = {"n": 0}
    handle = model.register_forward_pre_hook(lambda m, a: counted.__setitem__("n", counted["n"] + 1))
    again, _ = _predict(model, tok, frame, cfg, work_dir=tmp_path / "w")
    handle.remove()
    assert counted["n"] == 0 and np.array_equal(again, probs)


def test_the_time_model_learns_the_length_squared_term():
    """Fitted on long batches, the a·tokens + b·ΣL² + c model projects short ones exactly; a per-token rate
    (the old guard) would over-project them — the early projection was pessimistic."""
    a, b, c = 1e-3, 2e-5, 0.05
    cost = lambda n, length: a * n * length + b * n * length ** 2 + c  # noqa: E731
    guard = inference._Guard(lambda: 0.0, lambda _: None)
    for n, length in ((4, 2048), (6, 1500), (8, 1024), (10, 900)):
        guard.record(n, length, cost(n, length))
    np.testing.assert_allclose(guard.model(), [a, b, c], rtol=1e-6)
    rest = [(64, 128)] * 100
    truth = sum(cost(n, length) for n, length in rest)
    assert guard.plan_seconds(rest, 1) == pytest.approx(truth, rel=1e-6)
    per_token = guard.busy / guard.tokens * sum(n * length for n, length in rest)
    assert per_token > 1.5 * truth
    assert guard.plan_seconds(rest, 2) == pytest.approx(truth / 2, rel=1e-6)  # two workers


def test_the_budget_counts_from_the_kernel_start(loaded, synth_frame):
    """Time spent before ``score`` (installing, loading the model) is part of the budget."""
    model, tok = loaded
    cfg = dataclasses.replace(CFG, time_budget_s=100.0)
    probs, report = _predict(model, tok, synth_frame.iloc[:30], cfg, clock=lambda: 1000.0, started_at=899.0)
    assert report["steps"] == ["prior"] and report["sources"] == {"prior:deadline": 30}
    probs, report = _predict(model, tok, synth_frame.iloc[:30], cfg, clock=lambda: 1000.0, started_at=990.0)
    assert report["sources"] == {"model": 30}  # 10 of 100 s spent: time enough (this clock never moves)


def test_a_budget_already_spent_gives_priors_for_everything(loaded, synth_frame):
    model, tok = loaded
    cfg = InferenceConfig(**{**CFG.__dict__, "time_budget_s": 0.5})
    probs, report = _predict(model, tok, synth_frame.iloc[:30], cfg, clock=_fake_clock(1.0))
    assert report["steps"] == ["prior"] and report["sources"] == {"prior:deadline": 30}
    assert np.allclose(probs, 1 / 3)


class _NaNOnce:
    """Sets the logits of the first ``times`` forward calls to NaN (an fp16 overflow)."""

    def __init__(self, model, times):
        self.left = times
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.left > 0:
            self.left -= 1
            output.logits = torch.full_like(output.logits, float("nan"))
        return output


def test_a_nan_batch_is_recomputed_and_a_hopeless_row_gets_the_prior(loaded, synth_frame):
    model, tok = loaded
    frame = synth_frame.iloc[:20]
    clean, _ = _predict(model, tok, frame, InferenceConfig(**{**CFG.__dict__, "tta": False}))
    hook = _NaNOnce(model, 1)
    cfg = InferenceConfig(**{**CFG.__dict__, "tta": False, "token_budget": 100000, "max_batch_rows": 64})  # one batch
    said = []
    probs, report = _predict(model, tok, frame, cfg, log=said.append)
    hook.handle.remove()
    assert report["nan_rows"] == 20 and report["sources"] == {"model:no-tta": 20}
    np.testing.assert_allclose(probs, clean, atol=1e-5)
    assert any("recomputing them alone in fp32" in s for s in said)
    assert next(model.parameters()).dtype == torch.float32

    hook = _NaNOnce(model, 10**6)  # never recovers
    probs, report = _predict(model, tok, frame, cfg, priors={**inference.uniform_priors(), "overall": [0.3, 0.3, 0.4]})
    hook.handle.remove()
    assert report["sources"] == {"prior:non-finite": 20} and len(report["prior_rows"]) == 20
    assert np.allclose(probs, [0.3, 0.3, 0.4])


class _OOMAbove:
    def __init__(self, model, rows):
        self.rows, self.raised = rows, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if kwargs["input_ids"].shape[0] > self.rows:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_out_of_memory_splits_the_batch(loaded, synth_frame):
    model, tok = loaded
    frame = synth_frame.iloc[:40]
    clean, _ = _predict(model, tok, frame)
    oom = _OOMAbove(model, 3)
    probs, report = _predict(model, tok, frame)
    oom.handle.remove()
    assert oom.raised > 0 and report["oom_splits"] >= oom.raised
    np.testing.assert_allclose(probs, clean, atol=1e-5)


def _awkward_frame(tmp_path):
    huge = "word " * 10_000  # 50k characters
    rows = [
        ("a1", ["Hi?"], [None], [None]),  # both responses null
        ("a2", ["Hi?"], [""], ["Hello!"]),  # empty string A
        ("a3", ["Explain."], [huge], ["Short."]),
        ("a4", [f"turn {i}" for i in range(20)], [f"a{i}" for i in range(20)], [f"b{i}" for i in range(20)]),
        ("a5", ["Bad \ud83d surrogate"], ["x \udc00 y"], ["fine"]),
        ("a6", ["Same?"], ["Same answer."], ["Same answer."]),
        ("a7", ["Q"], ["A" * 3], [None]),
    ]
    raw = pd.DataFrame({"id": [r[0] for r in rows],
                        "prompt": [parsing.encode_cell(r[1]) for r in rows],
                        "response_a": [parsing.encode_cell(r[2]) for r in rows],
                        "response_b": [parsing.encode_cell(r[3]) for r in rows]})
    path = tmp_path / "awkward.csv"
    raw.to_csv(path, index=False)
    return path


def test_awkward_rows_all_get_valid_probabilities(loaded, tmp_path):
    model, tok = loaded
    frame = parsing.read_competition(_awkward_frame(tmp_path), on_bad_cell="text").frame
    for rule_priors in (True, False):
        cfg = InferenceConfig(**{**CFG.__dict__, "rule_priors": rule_priors})
        probs, report = _predict(model, tok, frame, cfg)
        assert probs.shape == (7, 3) and np.isfinite(probs).all() and np.allclose(probs.sum(1), 1)
        assert ((probs >= 0) & (probs <= 1)).all()
    assert report["sources"] == {"model": 7}  # without rules the model scores even the empty rows


def test_rule_priors_are_measured_on_train_rows(synth_frame):
    frame = synth_frame.copy()
    rules = inference.rules_of(frame)
    priors = inference.measure_priors(frame)
    assert set(inference.RULES) <= set(priors) and priors["rows"] == len(frame)
    for rule in inference.RULES:
        assert np.isclose(sum(priors[rule]), 1.0)
    assert priors["b_empty"] == [priors["a_empty"][i] for i in parsing.AB_SWAP]
    assert priors["identical"][0] == priors["identical"][1]
    a_empty = [lab for r, lab in zip(rules, frame["label"]) if r == "a_empty"]
    b_empty = [lab for r, lab in zip(rules, frame["label"]) if r == "b_empty"]
    assert priors["counts"]["a_empty"] == len(a_empty) + len(b_empty)


def test_rule_rows_take_the_prior_when_on(loaded, tmp_path):
    model, tok = loaded
    frame = parsing.read_competition(_awkward_frame(tmp_path), on_bad_cell="text").frame
    priors = {**inference.uniform_priors(), "both_empty": [0.1, 0.1, 0.8], "a_empty": [0.05, 0.9, 0.05],
              "b_empty": [0.9, 0.05, 0.05], "identical": [0.2, 0.2, 0.6]}
    probs, report = _predict(model, tok, frame, InferenceConfig(**{**CFG.__dict__, "rule_priors": True}),
                             priors=priors)
    by_id = dict(zip(frame["id"], probs))
    assert np.allclose(by_id["a1"], [0.1, 0.1, 0.8]) and np.allclose(by_id["a2"], [0.05, 0.9, 0.05])
    assert np.allclose(by_id["a6"], [0.2, 0.2, 0.6]) and np.allclose(by_id["a7"], [0.9, 0.05, 0.05])
    assert report["sources"]["model"] == 3


def test_lmsys_predict_writes_a_valid_submission_for_the_real_sample(classifier, real_sample, tmp_path, synth_dir):
    from lmsys_lib import cli

    out = tmp_path / "submission.csv"
    code = cli.main(["predict", "--model", str(classifier), "--data", str(real_sample / "test.csv"), "--out", str(out),
                     "--max-length", "256", "--devices", "cpu:2", "--priors-from", str(synth_dir / "train.csv"),
                     "--time-budget", "1h"])
    assert code == 0
    test = parsing.read_competition(real_sample / "test.csv").frame
    assert parsing.check_submission(pd.read_csv(out), test["id"].tolist()) == []
    report = json.loads((tmp_path / "predict" / "predictions" / "report.json").read_text())
    assert report["workers"] == 2 and report["rows"] == len(test)
    import time

    code = cli.main(["predict", "--model", str(classifier), "--data", str(real_sample / "test.csv"), "--out",
                     str(tmp_path / "late.csv"), "--max-length", "256", "--devices", "cpu", "--time-budget", "1h",
                     "--started-at", str(time.time() - 7200), "--work-dir", str(tmp_path / "late")])  # 2 h ago
    report = json.loads((tmp_path / "late" / "predictions" / "report.json").read_text())
    assert code == 0 and report["steps"] == ["prior"] and report["sources"] == {"prior:deadline": len(test)}
    assert parsing.check_submission(pd.read_csv(tmp_path / "late.csv"), test["id"].tolist()) == []


def test_two_cpu_workers_agree_with_one(classifier, synth_frame):
    models, tok, _ = inference.load_models(classifier, inference.devices_for("cpu:2"), log=lambda _: None)
    assert len(models) == 2 and models[0] is not models[1]
    frame = synth_frame.iloc[:60]
    one, _ = _predict(models[0], tok, frame)
    two, report = _predict(models, tok, frame)
    np.testing.assert_allclose(two, one, atol=1e-6)
    assert report["workers"] == 2


def test_durations_parse():
    assert inference.parse_duration("9h") == 32400 and inference.parse_duration("8h15m") == 29700
    assert inference.parse_duration("90") == 90 and inference.parse_duration(45.0) == 45.0
    with pytest.raises(ValueError, match="duration"):
        inference.parse_duration("soon")
    assert inference.parse_time("1796000000") == 1796000000.0
    assert inference.parse_time("2026-12-01T09:00:00+01:00") == inference.parse_time("2026-12-01T08:00:00")  # UTC
    with pytest.raises(ValueError, match="cannot read a time"):
        inference.parse_time("this morning")


def test_synthetic_lengths_pad_waste_is_small(tokenizer, synth_frame):
    from lmsys_lib.prompting import Packer

    lengths = Packer(tokenizer, PackConfig(max_length=512)).pack_frame(synth_frame)["n_tokens"].to_numpy()
    batches = batching.token_budget_batches(lengths, 8192, 64)
    assert batching.pad_waste(lengths, batches) <= 0.05


def test_a_crashing_worker_leaves_its_rows_to_the_other_and_none_is_lost(classifier, synth_frame):
    models, tok, _ = inference.load_models(classifier, inference.devices_for("cpu:2"), log=lambda _: None)

    def crash(module, args):
        raise RuntimeError("device lost (simulated)")

    handle = models[1].register_forward_pre_hook(crash)
    said = []
    probs, report = _predict(models, tok, synth_frame.iloc[:40], log=said.append)
    assert report["sources"] == {"model": 40}  # the healthy worker took every batch
    assert any("RuntimeError: device lost" in s for s in said) and report["errors"]
    handle.remove()
    models[0].register_forward_pre_hook(crash)
    probs, report = _predict(models[0], tok, synth_frame.iloc[:40])
    assert report["sources"] == {"prior:error": 40} and np.isfinite(probs).all()


def test_gemma2_runs_eager_and_keeps_its_bf16_embedding_scale_in_fp16(tmp_path, tokenizer):
    """Gemma-2 soft-caps attention logits (SDPA would drop the cap: eager is chosen), and scales embeddings
    by √hidden cast to the weight dtype — √72 is 8.5 in bf16 but 8.484 in fp16; a bf16-trained model run in
    fp16 on a T4 gets the value it was trained with."""
    from transformers import AutoModelForSequenceClassification

    base = modeling.save_tiny_checkpoint("gemma2", copy.deepcopy(tokenizer), tmp_path / "g", hidden=72)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "cls")
    modeling.load_tokenizer(base).save_pretrained(tmp_path / "cls")
    models, tok, _ = inference.load_models(tmp_path / "cls", inference.devices_for("cpu"), log=lambda _: None)
    assert models[0].config._attn_implementation == "eager"
    fp16 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls", dtype=torch.float16)
    embed = fp16.get_input_embeddings()
    assert float(embed.embed_scale.to(torch.float16)) == pytest.approx(8.484375)
    said = []
    inference.match_embed_scale(fp16, "bfloat16", said.append)
    assert float(embed.embed_scale.to(torch.float16)) == 8.5 and "bf16-rounded" in said[0]
    inference.match_embed_scale(fp16, "float16", said.append)  # an fp16-trained model is left alone
    assert len(said) == 1


def test_predict_proba_is_score_without_the_report(loaded, synth_frame):
    model, tok = loaded
    frame = synth_frame.iloc[:16]
    probs = inference.predict_proba(model, tok, frame, CFG, progress=False, log=lambda _: None)
    assert probs.shape == (16, 3) and np.array_equal(probs, _predict(model, tok, frame)[0])


def test_temperature_divides_the_logits_of_a_one_pass_row_and_comes_from_the_model_folder(loaded, synth_frame,
                                                                                       classifier, tmp_path):
    """T from temperature.json (or the contract) divides the logits of a one-pass row: log p_T = log p_1 / T + c
    per row; an explicit temperature wins over the file."""
    import dataclasses
    import shutil

    from lmsys_lib import evaluate

    model, tok = loaded
    rows = synth_frame.iloc[:24]
    plain = dataclasses.replace(CFG, tta=False)
    p1, _ = _predict(model, tok, rows, plain)
    p2, _ = _predict(model, tok, rows, dataclasses.replace(plain, temperature=2.0))
    centred = lambda p: np.log(p) - np.log(p).mean(axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centred(p2), centred(p1) / 2, atol=1e-5)
    folder = tmp_path / "model"
    shutil.copytree(classifier, folder)
    evaluate.save_temperature(folder, 2.0, {"log_loss_before": 1.2, "log_loss_after": 1.1, "rows": 9, "source": "t"})
    assert inference.model_temperature(plain, folder, log=lambda _: None).temperature == 2.0
    assert inference.model_temperature(dataclasses.replace(plain, temperature=0.5), folder).temperature == 0.5
    assert inference.model_temperature(plain, classifier).temperature == 1.0  # no file: unchanged
    with pytest.raises(ValueError, match="temperature must be > 0"):
        InferenceConfig(temperature=0.0)


def test_the_temperature_is_fitted_on_the_kernels_own_output_and_applied_once(loaded, synth_frame):
    """T is fitted on what ``score`` gives at T = 1 (both passes averaged) and ``score`` applies it once, after
    the passes: p ∝ p^(1/T) — the same map the fit optimised, so the fitted T is the best for the output."""
    from lmsys_lib.metrics import log_loss, softmax

    model, tok = loaded
    rows = synth_frame.iloc[:60]
    fit = inference.fit_output_temperature(model, tok, rows, CFG, log=lambda _: None)
    probs, report = _predict(model, tok, rows, dataclasses.replace(CFG, time_budget_s=1e9))
    assert report["tta_share"] == 1.0 and fit["tta_share"] == 1.0 and fit["rows"] == 60
    t, labels = fit["value"], rows["label"].to_numpy()
    tempered, _ = _predict(model, tok, rows, dataclasses.replace(CFG, temperature=t, time_budget_s=1e9))
    np.testing.assert_allclose(tempered, softmax(np.log(probs), t), atol=1e-12)
    assert log_loss(labels, tempered) == pytest.approx(fit["log_loss_after"])
    neighbours = [x for x in (t * 0.8, t * 1.25) if 0.05 <= x <= 20.0]  # inside the fit's bounds
    assert neighbours
    for other in neighbours:  # the fitted T beats its neighbours on the kernel's output
        worse, _ = _predict(model, tok, rows, dataclasses.replace(CFG, temperature=other, time_budget_s=1e9))
        assert log_loss(labels, worse) > fit["log_loss_after"]
    with pytest.raises(ValueError, match="labelled rows"):
        inference.fit_output_temperature(model, tok, rows.drop(columns="label"), CFG, log=lambda _: None)


def _gemma2_folder(tmp_path, tokenizer, name, softcap):
    from transformers import AutoModelForSequenceClassification

    from lmsys_lib import contract

    base = modeling.save_tiny_checkpoint("gemma2", copy.deepcopy(tokenizer), tmp_path / f"{name}-base", layers=4)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32)
    model.config.attn_logit_softcapping = softcap
    torch.manual_seed(3)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
        for layer in model.model.layers:  # large attention logits: a cap of 0.5 then changes them
            layer.self_attn.q_proj.weight.mul_(30.0)
    model.save_pretrained(tmp_path / name)
    modeling.load_tokenizer(base).save_pretrained(tmp_path / name)
    contract.write(tmp_path / name, PackConfig(max_length=128), None, "float32", "quantize")
    return tmp_path / name


def test_the_attention_gate_keeps_eager_unless_sdpa_without_the_cap_is_faithful(tmp_path, tokenizer, synth_frame):
    from lmsys_lib import contract

    rows = synth_frame.iloc[:40]
    cfg = dataclasses.replace(CFG, rule_priors=False)
    loose = _gemma2_folder(tmp_path, tokenizer, "loose", 50.0)  # Gemma-2's cap: these logits never reach it
    said = []
    result = inference.attention_gate(loose, rows, cfg, "cpu", max_mean_kl=1e-5, log=said.append)
    assert result["choice"] == "sdpa-no-softcap" and result["kl_mean"] < 1e-10 and "attention gate" in said[0]
    kl_loose = result["kl_mean"]
    assert contract.read(loose)["attention"]["choice"] == "sdpa-no-softcap"
    models, tok, _ = inference.load_models(loose, inference.devices_for("cpu"), log=said.append)
    assert models[0].config._attn_implementation == "sdpa"
    assert all(layer.self_attn.attn_logit_softcapping is None for layer in models[0].model.layers)
    assert any("passed the attention gate" in s for s in said)
    gated, _ = _predict(models[0], tok, rows, cfg)
    eager, _, _ = inference.load_models(_gemma2_folder(tmp_path, tokenizer, "plain", 50.0), inference.devices_for("cpu"),
                                        log=lambda _: None)
    np.testing.assert_allclose(gated, _predict(eager[0], tok, rows, cfg)[0], atol=1e-5)
    tight = _gemma2_folder(tmp_path, tokenizer, "tight", 0.5)  # a cap that bites: sdpa without it differs
    result = inference.attention_gate(tight, rows, cfg, "cpu", max_mean_kl=1e-5, log=lambda _: None)
    assert result["choice"] == "eager" and result["kl_mean"] > max(1e-5, 1e6 * kl_loose), result
    models, _, _ = inference.load_models(tight, inference.devices_for("cpu"), log=lambda _: None)
    assert models[0].config._attn_implementation == "eager"
    llama = inference.attention_gate(_classifier_dir(tmp_path, tokenizer), rows, cfg, "cpu", log=lambda _: None)
    assert llama["choice"] == "as loaded"  # no soft-capping: sdpa is already exact


def _classifier_dir(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    base = modeling.save_tiny_checkpoint("llama", copy.deepcopy(tokenizer), tmp_path / "l-base")
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).save_pretrained(tmp_path / "l")
    modeling.load_tokenizer(base).save_pretrained(tmp_path / "l")
    return tmp_path / "l"
