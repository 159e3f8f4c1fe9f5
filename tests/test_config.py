"""Configs refuse unknown keys, survive JSON, and guard run folders."""

from __future__ import annotations

import json

import pytest

from lmsys_lib import config as C


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"PackConfig: unknown key\(s\) \['max_len'\]"):
        C.from_dict(C.PackConfig, {"max_len": 1024})
    with pytest.raises(ValueError, match="unknown key"):
        C.DemoConfig.from_dict({"synth": {"rows": 5}})


def test_wrong_value_types_are_errors_naming_the_field():
    with pytest.raises(ValueError, match=r"SynthConfig.n_train: expected int, got str '5'"):
        C.DemoConfig.from_dict({"synth": {"n_train": "5"}})
    with pytest.raises(ValueError, match="DemoConfig.folds: expected an object"):
        C.DemoConfig.from_dict({"folds": "x"})
    assert C.from_dict(C.TrainConfig, {"lr": 1}).lr == 1.0  # an int is fine for a float


def test_json_round_trip():
    cfg = C.DemoConfig(inference=C.InferenceConfig(pack=C.PackConfig(max_length=300, fractions=(0.1, 0.45, 0.45)),
                                                   degrade_max_length=200))
    again = C.DemoConfig.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("cls, kwargs, message", [
    (C.SynthConfig, {"n_train": 0}, "n_train"),
    (C.SynthConfig, {"null_turn_rate": 2.0}, "null_turn_rate"),
    (C.PackConfig, {"keep_rounds": "middle"}, "keep_rounds"),
    (C.PackConfig, {"fractions": (0.0, 0.5, 0.5)}, "positive"),
    (C.PackConfig, {"cut_marker": ""}, "visible"),
    (C.FoldConfig, {"k": 1}, "k must be"),
])
def test_bad_values_fail_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_stage_guard(tmp_path):
    cfg = C.PackConfig(max_length=256)
    assert C.claim_stage(tmp_path, "pack", cfg)
    C.save_stage(tmp_path, "pack", cfg)
    assert not C.claim_stage(tmp_path, "pack", cfg)  # already done: a no-op
    assert C.claim_stage(tmp_path, "pack", cfg, force=True)
    with pytest.raises(C.StageConflictError, match="another config for stage 'pack'"):
        C.claim_stage(tmp_path, "pack", C.PackConfig(max_length=512))
    assert C.claim_stage(tmp_path, "pack", C.PackConfig(max_length=512), force=True)


def test_every_default_config_survives_a_json_round_trip():
    """A default whose Python type differs from its annotation (9 * 3600 is an int) would make the saved
    config unreadable by ``from_dict``."""
    import dataclasses as dc

    from lmsys_lib import config as C

    for cls in (C.SynthConfig, C.PackConfig, C.FoldConfig, C.ModelConfig, C.TrainConfig, C.PretrainConfig,
                C.TeacherConfig, C.DistillConfig, C.QuantizeConfig, C.InferenceConfig, C.DemoConfig):
        default = cls()
        assert C.from_dict(cls, C.to_dict(default)) == default, cls.__name__
        for field in dc.fields(cls):
            value = getattr(default, field.name)
            if field.type == "float":
                assert isinstance(value, float), f"{cls.__name__}.{field.name} default is {type(value).__name__}"


def test_resolve_takes_the_file_and_keeps_only_the_dry_run_fraction(tmp_path):
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"name": "from-file", "train": {"lr": 3e-5}}))
    lines = []
    cfg = C.resolve(C.TeacherConfig, path, {"name": "cell", "fraction": 0.1}, log=lines.append)
    assert cfg.name == "from-file" and cfg.train.lr == 3e-5 and cfg.fraction == 0.1
    assert "not used" in lines[0]
    assert C.resolve(C.TeacherConfig, path, {"name": "cell", "fraction": 1.0}, log=lines.append).fraction == 1.0
    assert C.resolve(C.TeacherConfig, None, {"name": "cell"}).name == "cell"
    path.write_text(json.dumps({"nmae": "typo"}))
    with pytest.raises(ValueError, match="unknown key"):
        C.resolve(C.TeacherConfig, path, {})
    with pytest.raises(ValueError, match="fraction"):
        C.DemoConfig(fraction=0)
