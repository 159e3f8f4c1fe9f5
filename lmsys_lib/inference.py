"""The offline inference kernel: token-budget batches, swap-TTA, two devices, deadline guard, resume.

Contract:
- ``predict_proba(models, tokenizer, frame, cfg)`` → (n, 3) probabilities in the input order, whatever
  order the rows come in; every row gets finite probabilities summing to 1. ``score`` is the same with the
  run's report (where each row's numbers came from, steps taken, NaN/OOM events, throughput).
- Rows are packed once per orientation with our own packer (the training format), sorted by length and cut
  into batches of at most ``token_budget`` padded tokens; each batch is padded only to its longest row.
  The batch plan is a pure function of the rows and the config, so a resumed run computes exactly the
  batches an uninterrupted one would.
- Swap-TTA: each row is also scored with A and B exchanged (the packer swaps the two spans; nothing else
  moves); the swapped pass's probabilities are un-permuted with ``parsing.AB_SWAP`` and averaged.
- Two devices: one model per device, each in its own thread, pulling batches from one queue (longest
  first) — both finish together whatever their speed. On a CPU the same code runs with one or two workers.
- Non-finite logits: the batch is recomputed row by row in fp32 (the model is cast up and back, which is
  lossless for fp16/bf16 weights); rows still non-finite get the prior, and the log names them. A CUDA
  out-of-memory error splits the batch in halves and retries; one row that still does not fit gets the prior.
- Deadline guard: before each batch the finish is projected from the measured padded-token throughput.
  When it would pass ``time_budget_s`` it degrades in declared steps — (1) drop TTA for the remaining rows,
  (2) re-pack the remaining rows at ``degrade_max_length``, (3) the prior for every row left — and records
  each step taken. A complete, valid submission is always written.
- Resume: finished batches are appended to ``work_dir/predictions/part-*.parquet`` every
  ``checkpoint_every`` rows; a restarted run with the same ``work_dir`` (and the same rows and config)
  skips them and ends with the same file as an uninterrupted run.
- Rule priors: rows whose responses are both empty/null, one empty, or identical get the class frequencies
  measured on training rows of the same kind (``measure_priors``), when ``rule_priors`` is on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .batching import collate, token_budget_batches
from .config import InferenceConfig, to_dict
from .parsing import AB_SWAP, LABEL_COLUMNS, is_empty, normalise_text

RULES = ("both_empty", "a_empty", "b_empty", "identical")


# -- rule priors -----------------------------------------------------------------------------------


def row_rule(prompt: Sequence[str], a: Sequence[str], b: Sequence[str]) -> str | None:
    """Which rule a row falls under (None: the model decides)."""
    ea, eb = is_empty(a), is_empty(b)
    if ea and eb:
        return "both_empty"
    if ea:
        return "a_empty"
    if eb:
        return "b_empty"
    if [normalise_text(t) for t in a] == [normalise_text(t) for t in b]:
        return "identical"
    return None


def rules_of(frame: pd.DataFrame) -> list[str | None]:
    return [row_rule(p, a, b) for p, a, b in zip(frame["prompt"], frame["response_a"], frame["response_b"])]


def measure_priors(train: pd.DataFrame, smoothing: float = 1.0) -> dict[str, Any]:
    """Class frequencies of the labelled ``train`` rows under each rule, Laplace-smoothed towards the
    overall label distribution. A-empty and B-empty rows are pooled through the A/B swap (the B-empty
    prior is the A-empty one with columns permuted), which doubles the evidence for both."""
    labels = train["label"].to_numpy()
    overall = np.bincount(labels, minlength=3) / max(len(labels), 1)
    rules = rules_of(train)
    counts = {rule: np.zeros(3) for rule in RULES}
    for rule, label in zip(rules, labels):
        if rule == "b_empty":
            counts["a_empty"][AB_SWAP[label]] += 1
        elif rule is not None:
            counts[rule][label] += 1
    priors: dict[str, Any] = {"overall": overall.tolist(), "rows": len(labels), "counts": {}}
    for rule in ("both_empty", "a_empty", "identical"):
        c = counts[rule]
        priors[rule] = ((c + smoothing * 3 * overall) / (c.sum() + smoothing * 3)).tolist()
        priors["counts"][rule] = int(c.sum())
    for rule in ("both_empty", "identical"):  # symmetric rows: P(A wins) = P(B wins) by symmetry
        p = np.asarray(priors[rule])
        p[0] = p[1] = (p[0] + p[1]) / 2
        priors[rule] = p.tolist()
    priors["b_empty"] = [priors["a_empty"][i] for i in AB_SWAP]
    priors["counts"]["b_empty"] = priors["counts"]["a_empty"]
    return priors


def uniform_priors() -> dict[str, Any]:
    """No training rows at hand: every rule gets the uniform prior (and the log says so)."""
    third = [1 / 3] * 3
    return {rule: third for rule in (*RULES, "overall")} | {"rows": 0, "counts": {}}


# -- the kernel ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """What remains to run: batches of row positions, the ids per orientation, the passes per batch."""

    batches: list[list[int]]
    ids: dict[bool, list[Any]]  # swap → packed ids (row position → ids)
    tta: bool
    max_length: int


class _Guard:
    """Projected finish from measured throughput; declares each degradation step once."""

    def __init__(self, budget_s: float, clock: Callable[[], float], log: Callable[[str], None]):
        self.budget, self.clock, self.log = budget_s, clock, log
        self.start = clock()
        self.tokens = 0.0
        self.busy = 0.0
        self.steps: list[str] = []

    def record(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.busy += seconds

    def rate(self) -> float | None:
        return self.tokens / self.busy if self.busy > 0 and self.tokens > 0 else None

    def projected(self, remaining_tokens: float, workers: int) -> float | None:
        rate = self.rate()
        if rate is None:
            return None
        return self.clock() - self.start + remaining_tokens / (rate * workers)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def step(self, name: str, detail: str) -> None:
        self.steps.append(name)
        self.log(f"deadline guard: {name} — {detail}")


def predict_proba(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig | None = None,
                  **kwargs: Any) -> np.ndarray:
    """(n, 3) probabilities of ``frame``'s rows in input order (``score`` without the report)."""
    return score(models, tokenizer, frame, cfg, **kwargs)[0]


def score(models: Any, tokenizer: Any, frame: pd.DataFrame, cfg: InferenceConfig | None = None,
          work_dir: str | Path | None = None, priors: dict[str, Any] | None = None,
          log: Callable[[str], None] = print, progress: bool = True,
          clock: Callable[[], float] = time.perf_counter) -> tuple[np.ndarray, dict[str, Any]]:
    """Score every row of ``frame`` (a conversation frame from ``parsing``) → ((n, 3) probabilities in
    input order, report).

    Args:
        models: one model, or one per device (a list), each already on its device and in eval mode.
        tokenizer: the models' tokenizer (its pad id is used for padding).
        cfg: packing, batching, TTA, deadline and checkpoint settings.
        work_dir: where checkpoints go (``predictions/``); None: no checkpoints, no resume.
        priors: ``measure_priors`` output; None → uniform priors for the rule rows and for fallbacks.
        clock: the deadline guard's clock (tests pass a fake one).
    Returns:
        probabilities and a report: rows per source (model, model without TTA, short, rule, prior),
        degradation steps, NaN/OOM events, throughput, seconds.
    """
    from .prompting import Packer

    cfg = cfg or InferenceConfig()
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    Packer(tokenizer, dataclasses.replace(cfg.pack, max_length=cfg.degrade_max_length))  # too short: fail now
    priors = priors or uniform_priors()
    start = time.perf_counter()
    n = len(frame)
    probs = np.full((n, 3), np.nan)
    source = np.array([""] * n, dtype=object)
    rules = rules_of(frame) if cfg.rule_priors else [None] * n
    for i, rule in enumerate(rules):
        if rule is not None:
            probs[i], source[i] = priors[rule], f"rule:{rule}"
    store = _Store(work_dir, frame, cfg) if work_dir else None
    if store:
        for rows, block, how in store.load():
            probs[rows], source[rows] = block, how
    todo = [i for i in range(n) if not source[i]]
    events: dict[str, Any] = {"nan_rows": 0, "prior_rows": [], "oom_splits": 0}
    guard = _Guard(cfg.time_budget_s, clock, log)
    plan = _plan(frame, todo, tokenizer, cfg, cfg.pack.max_length, cfg.tta)
    if store:
        plan.batches = [b for b in plan.batches if not store.done.issuperset(b)]
    log(f"inference: {n} rows, {n - len(todo)} by rule or resumed, {sum(map(len, plan.batches))} to score in "
        f"{len(plan.batches)} batches on {len(models)} worker(s), TTA {'on' if cfg.tta else 'off'}, "
        f"max_length {cfg.pack.max_length}, budget {cfg.time_budget_s / 3600:.2f} h")
    error = _run(models, tokenizer, frame, plan, cfg, guard, probs, source, events, store, priors, log, progress)
    left = np.flatnonzero(source == "")
    if len(left):  # nothing may stay empty: the deadline ran out, or every worker died
        probs[left], source[left] = priors["overall"], "prior:error" if error is not None else "prior:deadline"
        events["prior_rows"] += [frame["id"].iloc[i] for i in left]
    probs = _normalised(probs)
    counts = pd.Series(source).value_counts().to_dict()
    report = {"rows": n, "sources": {str(k): int(v) for k, v in counts.items()}, "steps": guard.steps,
              "nan_rows": events["nan_rows"], "prior_rows": events["prior_rows"], "oom_splits": events["oom_splits"],
              "tokens_per_s": guard.rate(), "seconds": round(time.perf_counter() - start, 2),
              "workers": len(models), "config": to_dict(cfg)}
    if store:
        store.finish(report)
    log(f"inference done in {report['seconds']:.1f} s: {report['sources']}"
        + (f"; steps taken: {guard.steps}" if guard.steps else ""))
    return probs, report


def _normalised(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    return probs / probs.sum(axis=1, keepdims=True)


def _plan(frame: pd.DataFrame, rows: list[int], tokenizer: Any, cfg: InferenceConfig, max_length: int,
          tta: bool) -> _Plan:
    from .prompting import Packer

    pack = dataclasses.replace(cfg.pack, max_length=max_length)
    part = frame.iloc[rows]
    swaps = (False, True) if tta else (False,)
    packed = Packer(tokenizer, pack).pack_frame_orientations(part, swaps) if rows else [pd.DataFrame()] * len(swaps)
    ids: dict[bool, list[Any]] = {}
    for swap, table in zip(swaps, packed):
        full: list[Any] = [None] * len(frame)
        for pos, x in zip(rows, table["input_ids"] if rows else []):
            full[pos] = x
        ids[swap] = full
    lengths = [len(ids[False][r]) for r in rows]
    local = token_budget_batches(lengths, cfg.token_budget, cfg.max_batch_rows)
    return _Plan([[rows[i] for i in b] for b in local], ids, tta, max_length)


def _padded_tokens(plan: _Plan, batches: list[list[int]]) -> float:
    passes = 2 if plan.tta else 1
    return float(sum(len(b) * max(len(plan.ids[False][r]) for r in b) for b in batches) * passes)


def _run(models, tokenizer, frame, plan, cfg, guard, probs, source, events, store, priors, log,
         progress) -> BaseException | None:
    from tqdm.auto import tqdm

    work: queue.Queue = queue.Queue()
    for batch in plan.batches:
        work.put(batch)
    lock = threading.Lock()
    state = {"plan": plan, "stop": False, "error": None, "remaining": _padded_tokens(plan, plan.batches)}
    total_rows = sum(map(len, plan.batches))
    bar = tqdm(total=total_rows, desc="predict", unit="row", disable=not progress)

    def next_batch() -> tuple[list[int], _Plan] | None:
        with lock:
            if state["stop"]:
                return None
            _degrade(frame, tokenizer, cfg, guard, state, work, len(models), log)
            if state["stop"]:
                return None
            try:
                batch = work.get_nowait()
            except queue.Empty:
                return None
            state["remaining"] -= _padded_tokens(state["plan"], [batch])
            return batch, state["plan"]

    def worker(model: Any) -> None:
        item = None
        try:
            while (item := next_batch()) is not None:
                batch, current = item
                t0 = guard.clock()
                block = _score_batch(model, tokenizer, batch, current, events, log)
                seconds = guard.clock() - t0
                how = "model" if current.tta else "model:no-tta"
                if current.max_length < cfg.pack.max_length:
                    how += f":len{current.max_length}"
                with lock:
                    guard.record(_padded_tokens(current, [batch]), seconds)
                    bad = ~np.isfinite(block).all(axis=1)
                    block[bad] = priors["overall"]
                    probs[batch] = block
                    source[batch] = [("prior:non-finite" if b else how) for b in bad]
                    events["prior_rows"] += [frame["id"].iloc[r] for r, b in zip(batch, bad) if b]
                    if store:
                        store.add(batch, probs[batch], source[batch])
                    bar.update(len(batch))
                    eta = guard.projected(state["remaining"], len(models))
                    if eta is not None:
                        bar.set_postfix_str(f"finish ≈ {eta / 60:.1f} min of {cfg.time_budget_s / 60:.0f}")
        except BaseException as err:  # noqa: BLE001 — reported; the other worker and the prior fallback finish
            with lock:
                state["error"] = err
                if item is not None and item[1] is state["plan"] and not isinstance(err, KeyboardInterrupt):
                    # its batch goes back to the queue (unless the plan was re-packed meanwhile)
                    work.put(item[0])
                    state["remaining"] += _padded_tokens(item[1], [item[0]])
            log(f"worker on {getattr(model, 'device', '?')} stopped: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(m,), daemon=True) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if store:
        store.flush()
    if isinstance(state["error"], KeyboardInterrupt):
        raise state["error"]
    return state["error"]


def _degrade(frame, tokenizer, cfg, guard, state, work, workers, log) -> None:
    """Called (under the lock) before each batch: take the next declared step while the projection
    exceeds the budget."""
    plan: _Plan = state["plan"]
    if guard.elapsed() > cfg.time_budget_s:
        state["stop"] = True
        guard.step("prior", f"time budget spent with {sum(map(len, work.queue))} rows left: they get the prior")
        return
    projected = guard.projected(state["remaining"], workers)  # a running total: O(1) per batch
    if projected is None or projected <= cfg.time_budget_s:
        return
    remaining = list(work.queue)
    if plan.tta:
        state["plan"] = dataclasses.replace(plan, tta=False)
        state["remaining"] = _padded_tokens(state["plan"], remaining)
        guard.step("no-tta", f"projected {projected / 60:.1f} min > budget {cfg.time_budget_s / 60:.1f} min: "
                             f"TTA dropped for the remaining {sum(map(len, remaining))} rows")
        return
    if plan.max_length > cfg.degrade_max_length:
        rows = sorted(r for b in remaining for r in b)
        with work.mutex:
            work.queue.clear()
        short = _plan(frame, rows, tokenizer, cfg, cfg.degrade_max_length, False)
        for batch in short.batches:
            work.put(batch)
        state["plan"] = short
        state["remaining"] = _padded_tokens(short, short.batches)
        guard.step("short", f"projected {projected / 60:.1f} min: the remaining {len(rows)} rows re-packed at "
                            f"max_length {cfg.degrade_max_length}")
        return
    state["stop"] = True
    guard.step("prior", f"projected {projected / 60:.1f} min even without TTA at max_length "
                        f"{plan.max_length}: the remaining {sum(map(len, remaining))} rows get the prior")


def _score_batch(model: Any, tokenizer: Any, batch: list[int], plan: _Plan, events: dict[str, Any],
                 log: Callable[[str], None]) -> np.ndarray:
    """(len(batch), 3) probabilities: plain pass (+ un-permuted swapped pass), NaN and OOM handled."""
    from .metrics import softmax

    out = softmax(_logits(model, tokenizer, [plan.ids[False][r] for r in batch], events, log))
    if plan.tta:
        swapped = softmax(_logits(model, tokenizer, [plan.ids[True][r] for r in batch], events, log))
        out = (out + swapped[:, list(AB_SWAP)]) / 2
    return out


def _logits(model: Any, tokenizer: Any, rows: list[Any], events: dict[str, Any],
            log: Callable[[str], None]) -> np.ndarray:
    """Logits of ``rows`` (fp32 numpy); OOM → halves; non-finite rows → recomputed one by one in fp32."""
    import torch

    try:
        logits = _forward(model, tokenizer, rows)
    except torch.OutOfMemoryError:
        if len(rows) == 1:
            log("out of memory on a single row: it gets the prior")
            return np.full((1, 3), np.nan, dtype=np.float32)
        events["oom_splits"] += 1
        _free(model)
        half = len(rows) // 2
        return np.concatenate([_logits(model, tokenizer, rows[:half], events, log),
                               _logits(model, tokenizer, rows[half:], events, log)])
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
        events["nan_rows"] += len(bad)
        log(f"non-finite logits in {len(bad)} of {len(rows)} rows: recomputing them one by one in fp32")
        for i in bad:
            logits[i] = _forward_fp32(model, tokenizer, rows[i])
    return logits


def _forward(model: Any, tokenizer: Any, rows: list[Any]) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float().cpu().numpy()


def _forward_fp32(model: Any, tokenizer: Any, row: Any) -> np.ndarray:
    """One row with the model cast to fp32 and back (lossless for fp16/bf16 weights); NaN if that fails."""
    import torch

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    try:
        model.float()
        return _forward(model, tokenizer, [row])[0]
    except (RuntimeError, ValueError, torch.OutOfMemoryError):  # a kernel without fp32, or no room for it
        return np.full(3, np.nan, dtype=np.float32)
    finally:
        model.to(dtype)


def _free(model: Any) -> None:
    import torch

    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()


# -- models -----------------------------------------------------------------------------------------


def devices_for(spec: str = "auto") -> list[Any]:
    """'auto' → every CUDA device (else one CPU worker); 'cpu' / 'cpu:2' → one / two CPU workers;
    'cuda:0,cuda:1' → those devices."""
    import torch

    if spec == "auto":
        count = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
    if spec.startswith("cpu"):
        workers = int(spec.split(":")[1]) if ":" in spec else 1
        return [torch.device("cpu")] * workers
    return [torch.device(d.strip()) for d in spec.split(",")]


def load_models(model_dir: str | Path, devices: Sequence[Any], log: Callable[[str], None] = print) -> tuple[
        list[Any], Any, dict[str, Any]]:
    """One model per device (eval mode) + the tokenizer: a GPTQ folder through ``quantize.load_quantized``
    (the kernel recorded for the device), a plain checkpoint in fp16 on pre-Ampere GPUs (a T4 has no bf16),
    bf16 on newer ones, fp32 on a CPU. Prints the device map of each model and warns if any part is off
    its device."""
    from .modeling import attention_for, dtype_for, load_tokenizer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    sidecar = model_dir / "quantize.json"  # a GPTQ checkpoint remembers the dtype of the model it came from
    trained = (json.loads(sidecar.read_text(encoding="utf-8")).get("source_dtype") if sidecar.exists() else None) \
        or config.get("dtype") or config.get("torch_dtype")
    models, info = [], {}
    for device in devices:
        if config.get("quantization_config"):
            from .quantize import load_quantized

            model, _, info = load_quantized(model_dir, device, log=log)
        else:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            dtype = dtype_for(device)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=dtype, attn_implementation=attention_for(AutoConfig.from_pretrained(model_dir)))
            model = model.to(device).eval()
            info = {"kernel": "dense", "dtype": str(dtype).split(".")[-1], "device": str(device)}
        match_embed_scale(model, trained, log)
        placed = {str(p.device) for p in model.parameters()}
        if placed != {str(device) if device.type == "cpu" else f"{device.type}:{device.index or 0}"}:
            log(f"WARNING: model for {device} has parameters on {sorted(placed)} — offloaded parts run far slower")
        log(f"model on {device}: {info.get('kernel')} kernel, {info.get('dtype')}")
        models.append(model)
    return models, load_tokenizer(model_dir), info


def match_embed_scale(model: Any, trained_dtype: str | None, log: Callable[[str], None] = print) -> None:
    """Gemma multiplies embeddings by √hidden cast to the weights' dtype: √3584 is 60.0 in bf16 (what a
    bf16-trained model saw) but 59.875 in fp16. Running such a model in fp16 (a T4), set the scale to the
    bf16-rounded value, which fp16 holds exactly."""
    import torch

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    scale = getattr(embed, "embed_scale", None)
    if scale is None or trained_dtype not in ("bfloat16", "bf16") or embed.weight.dtype != torch.float16:
        return
    wanted = float(torch.tensor(float(getattr(embed, "scalar_embed_scale", scale))).to(torch.bfloat16))
    if float(scale.to(torch.float16)) != wanted:
        embed.embed_scale = torch.tensor(wanted, device=scale.device)
        log(f"embedding scale set to {wanted} (bf16-rounded, as trained) for fp16 inference")


# -- checkpoints -----------------------------------------------------------------------------------


class _Store:
    """Finished batches → ``predictions/part-NNNNN.parquet`` (position, id, probabilities, source)."""

    def __init__(self, work_dir: str | Path, frame: pd.DataFrame, cfg: InferenceConfig):
        self.dir = Path(work_dir) / "predictions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.every = cfg.checkpoint_every
        self.ids = frame["id"].astype(str).tolist()
        self.pending: list[pd.DataFrame] = []
        self.pending_rows = 0
        self.done: set[int] = set()
        key = {"config": to_dict(cfg), "rows": len(self.ids), "first": self.ids[:3], "last": self.ids[-3:]}
        meta = self.dir / "run.json"
        if meta.exists() and json.loads(meta.read_text(encoding="utf-8")) != key:
            raise ValueError(f"{meta} belongs to a run with other rows or settings; use another work dir")
        meta.write_text(json.dumps(key, indent=2), encoding="utf-8")

    def load(self) -> list[tuple[list[int], np.ndarray, list[str]]]:
        out = []
        for part in sorted(self.dir.glob("part-*.parquet")):
            table = pd.read_parquet(part)
            rows = table["position"].tolist()
            if [self.ids[r] for r in rows] != table["id"].astype(str).tolist():
                raise ValueError(f"{part}: ids do not match the rows at their positions (another test file?)")
            out.append((rows, table[list(LABEL_COLUMNS)].to_numpy(), table["source"].tolist()))
            self.done.update(rows)
        return out

    def add(self, rows: list[int], probs: np.ndarray, source: Sequence[str]) -> None:
        self.pending.append(pd.DataFrame({"position": rows, "id": [self.ids[r] for r in rows],
                                          **{c: probs[:, i] for i, c in enumerate(LABEL_COLUMNS)},
                                          "source": list(source)}))
        self.pending_rows += len(rows)
        if self.pending_rows >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        index = len(list(self.dir.glob("part-*.parquet")))
        tmp = self.dir / f"part-{index:05d}.parquet.tmp"
        pd.concat(self.pending, ignore_index=True).to_parquet(tmp)
        tmp.rename(self.dir / f"part-{index:05d}.parquet")  # atomic: a part is whole or absent
        self.pending, self.pending_rows = [], 0

    def finish(self, report: dict[str, Any]) -> None:
        (self.dir / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


# -- submission ------------------------------------------------------------------------------------


def write_submission(ids: Sequence[Any], probs: np.ndarray, path: str | Path) -> Path:
    """``id, winner_model_a, winner_model_b, winner_tie`` in the given order, checked before writing."""
    from .parsing import check_submission

    frame = pd.DataFrame({"id": list(ids), **{c: probs[:, i] for i, c in enumerate(LABEL_COLUMNS)}})
    problems = check_submission(frame, list(ids))
    if problems:
        raise ValueError(f"refusing to write an invalid submission: {problems[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def parse_duration(text: str | float) -> float:
    """'9h', '8h30m', '45m', '90s' or seconds → seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"cannot read a duration from {text!r} (e.g. 9h, 8h30m, 45m, 600)")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


def projected_seconds(rows: int, tokens_per_row: float, tokens_per_s: float, tta: bool, devices: int) -> float:
    """Time to score ``rows`` at a measured padded-token throughput per device."""
    return rows * tokens_per_row * (2 if tta else 1) / (tokens_per_s * devices) if tokens_per_s > 0 else math.inf
