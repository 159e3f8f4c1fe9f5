"""The offline wheelhouse: target markers, exclusions, torch refusal, conflicts, metadata reading (fast, on
hand-made wheels and a fake index), and the real thing (slow): build the wheel, resolve, install offline."""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from lmsys_lib import wheelhouse
from lmsys_lib.wheelhouse import KAGGLE_SHIPS, Target

ROOT = Path(__file__).resolve().parents[1]
KAGGLE = Target.kaggle("3.11")  # the mechanics on a fixed Python; the default follows KAGGLE_IMAGE


def _metadata(name: str, version: str, requires=(), extras=(), metadata_version="2.1", dynamic=()) -> str:
    lines = [f"Metadata-Version: {metadata_version}", f"Name: {name}", f"Version: {version}"]
    lines += [f"Provides-Extra: {e}" for e in extras] + [f"Dynamic: {d}" for d in dynamic]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(lines) + "\n\n"


def make_wheel(folder: Path, name: str, version: str, requires=(), extras=(), tag="py3-none-any") -> Path:
    """A throwaway wheel: the METADATA the resolver reads, and the WHEEL file pip wants."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", _metadata(name, version, requires, extras))
        archive.writestr(f"{stem}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
    return path


def make_sdist(folder: Path, name: str, version: str, **metadata) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}.tar.gz"
    data = _metadata(name, version, **metadata).encode()
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"{stem}/PKG-INFO")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A fake index replacing `pip download`: name → files; serves the newest version matching the spec."""
    files: dict[str, list[Path]] = {}
    asked: list[str] = []

    def download(spec, target, out_dir):
        req = Requirement(spec)
        asked.append(canonicalize_name(req.name))
        candidates = [p for p in files.get(canonicalize_name(req.name), [])
                      if req.specifier.contains(wheelhouse.read_metadata(p).version, prereleases=True)]
        if not candidates:
            return None, f"ERROR: No matching distribution found for {spec}"
        best = max(candidates, key=lambda p: Version(wheelhouse.read_metadata(p).version))
        dest = out_dir / best.name
        dest.write_bytes(best.read_bytes())
        return dest, ""

    def add(path: Path) -> Path:
        files.setdefault(wheelhouse.read_metadata(path).name, []).append(path)
        return path

    monkeypatch.setattr(wheelhouse, "_download", download)
    add.asked = asked  # type: ignore[attr-defined]
    add.src = tmp_path / "index"  # type: ignore[attr-defined]
    return add


def resolve(tmp_path, requirements, **kwargs):
    kwargs.setdefault("log", lambda line: None)
    return wheelhouse.build_wheelhouse(tmp_path / "house", requirements, kwargs.pop("target", KAGGLE), **kwargs)


# ---------------------------------------------------------------- target and markers

def test_kaggle_target_environment_and_pip_options():
    env = KAGGLE.marker_environment(extra="quantize")
    assert env["python_version"] == "3.11" and env["sys_platform"] == "linux" and env["extra"] == "quantize"
    assert (env["platform_machine"], env["platform_system"], env["os_name"]) == ("x86_64", "Linux", "posix")
    assert env["implementation_name"] == "cpython" and env["python_full_version"].startswith("3.11.")
    # pip takes each --platform literally: every glibc level from Kaggle's down, with the legacy aliases
    assert {"manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
            "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"} <= set(KAGGLE.platforms)
    assert "manylinux_2_36_x86_64" not in KAGGLE.platforms
    args = KAGGLE.pip_args()
    assert args[:6] == ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    assert args.count("--platform") == len(KAGGLE.platforms)
    assert Target.kaggle("3.12").abi == "cp312"


def test_target_fits_wheel_tags():
    assert KAGGLE.fits("x-1.0-py3-none-any.whl") and KAGGLE.fits("x-1.0-cp311-cp311-linux_x86_64.whl")
    assert KAGGLE.fits("x-1.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl")
    assert not KAGGLE.fits("x-1.0-cp312-cp312-manylinux_2_17_x86_64.whl")
    assert not KAGGLE.fits("x-1.0-cp311-cp311-win_amd64.whl")
    assert not KAGGLE.fits("x-1.0-cp311-cp311-manylinux_2_39_x86_64.whl")  # newer glibc than Kaggle's
    assert KAGGLE.fits("m-1.16.0-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.musllinux_1_1_x86_64.whl")


def test_local_target_is_the_running_interpreter():
    local = Target.local()
    env = local.marker_environment()
    from packaging.markers import default_environment
    for key in ("python_version", "python_full_version", "sys_platform", "platform_machine",
                "implementation_name"):
        assert env[key] == default_environment()[key]


def test_markers_are_evaluated_for_the_target(tmp_path, index):
    index(make_wheel(index.src, "keep", "1.0"))
    index(make_wheel(index.src, "old-only", "1.0"))
    report = resolve(tmp_path, ['old-only; python_version < "3.10"', 'winonly; sys_platform == "win32"',
                                'keep; platform_machine == "x86_64" and python_version >= "3.11"'],
                     exclude=frozenset())
    assert [f.name for f in report.files] == ["keep"]
    assert set(report.skipped_by_marker) == {'old-only; python_version < "3.10"',
                                             'winonly; sys_platform == "win32"'}
    assert report.skipped_by_marker['winonly; sys_platform == "win32"'] == ["(requested)"]
    assert index.asked == ["keep"]  # nothing else was even looked up
    # the same requirement under Python 3.9 would be wanted
    assert Requirement('x; python_version < "3.10"').marker.evaluate(Target.kaggle("3.9").marker_environment())


def test_extras_follow_dependencies_only_when_asked(tmp_path, index):
    index(make_wheel(index.src, "lib", "1.0", extras=["fast", "test"], requires=[
        'speedup; extra == "fast"', 'pytest; extra == "test"', 'colorama; os_name == "nt"']))
    index(make_wheel(index.src, "speedup", "2.0"))
    report = resolve(tmp_path, ["lib", "lib[fast]"], exclude=frozenset())
    assert sorted(f.name for f in report.files) == ["lib", "speedup"]
    assert report.files[1].required_by == ["lib"]
    # skipped because of the target, listed; skipped because nobody asked for [test], not listed
    assert list(report.skipped_by_marker) == ['colorama; os_name == "nt"']


# ---------------------------------------------------------------- exclusions and torch

def test_kaggle_ships_are_excluded_and_recorded_with_their_requirer(tmp_path, index):
    index(make_wheel(index.src, "mylib", "1.0", requires=["numpy>=1.26", "nvidia-cublas-cu12", "Torch>=2.4",
                                                          "tiny"]))
    index(make_wheel(index.src, "tiny", "0.1", requires=["NumPy"]))
    report = resolve(tmp_path, ["mylib"])
    assert sorted(f.name for f in report.files) == ["mylib", "tiny"]
    assert report.excluded == {"numpy": ["mylib (>=1.26)", "tiny"], "nvidia-cublas-cu12": ["mylib"],
                               "torch": ["mylib (>=2.4)"]}
    assert set(index.asked) == {"mylib", "tiny"}
    assert "numpy ← mylib (>=1.26), tiny" in report.summary()
    assert {"torch", "nvidia-*", "transformers", "numpy"} <= KAGGLE_SHIPS


def test_torch_is_refused_even_when_not_excluded(tmp_path, index):
    with pytest.raises(ValueError, match="refusing to put torch in the wheelhouse.*CUDA build"):
        resolve(tmp_path, ["torch==2.13.0"], exclude=frozenset())
    index(make_wheel(index.src, "needs-torch", "1.0", requires=["torch>=2.0"]))
    with pytest.raises(ValueError, match="needs-torch requires torch>=2.0: refusing"):
        resolve(tmp_path, ["needs-torch"], exclude={"numpy"})
    torch_wheel = make_wheel(tmp_path / "mine", "torch", "2.13.0", tag="cp311-cp311-manylinux_2_28_x86_64")
    with pytest.raises(ValueError, match="refusing to put torch"):
        resolve(tmp_path, [], extra_wheels=[torch_wheel])
    assert "torch" not in index.asked


# ---------------------------------------------------------------- conflicts, sdists, extra wheels

def test_conflict_names_both_requirers(tmp_path, index):
    index(make_wheel(index.src, "a", "1.0", requires=["shared>=2"]))
    index(make_wheel(index.src, "b", "1.0", requires=["c"]))
    index(make_wheel(index.src, "c", "1.0", requires=["shared<2"]))
    for version in ("1.5", "2.1"):
        index(make_wheel(index.src, "shared", version))
    report = resolve(tmp_path, ["a", "b"], exclude=frozenset())
    assert {f.name: f.version for f in report.files}["shared"] == "2.1"
    assert report.conflicts == ["shared: c requires <2 but 2.1 was chosen (for a)"]
    assert not report.ok and "CONFLICT shared" in report.summary()


def test_a_missing_distribution_is_a_problem(tmp_path, index):
    report = resolve(tmp_path, ["nowhere>=1"], exclude=frozenset())
    assert not report.ok and report.files == []
    assert report.problems[0].startswith("nowhere>=1 (required by (requested)): no file for the target")


def test_sdist_is_recorded_with_guidance_and_unknown_dependencies(tmp_path, index):
    index(make_sdist(index.src, "gptqmodel", "7.6.0"))  # metadata 2.1, no Requires-Dist: unknown
    index(make_sdist(index.src, "static", "1.0", metadata_version="2.4", requires=["tiny"]))
    index(make_wheel(index.src, "tiny", "0.1"))
    report = resolve(tmp_path, ["gptqmodel==7.6.0", "static"], exclude=frozenset(), build_pure_sdists=False)
    assert [(f.name, f.kind) for f in report.files] == [
        ("gptqmodel", "sdist"), ("static", "sdist"), ("tiny", "wheel")]
    message = report.sdists[0]
    for part in ("compile it offline", "internet on", "pip wheel --no-deps 'gptqmodel==7.6.0' -w wheels/",
                 "extra_wheels", "dependencies are unknown"):
        assert part in message
    assert "unknown" not in report.sdists[1]  # metadata 2.2+: Requires-Dist is authoritative
    assert report.ok  # an sdist is a warning, not a failure


def test_read_metadata_follows_pep_643(tmp_path):
    static = make_sdist(tmp_path, "s", "1.0", metadata_version="2.4")
    dynamic = make_sdist(tmp_path / "d", "s", "1.0", metadata_version="2.4", dynamic=["Requires-Dist"])
    old = make_sdist(tmp_path / "o", "s", "1.0", metadata_version="1.2")
    assert wheelhouse.read_metadata(static).requires == ()
    assert wheelhouse.read_metadata(dynamic).requires is None and wheelhouse.read_metadata(old).requires is None
    wheel = wheelhouse.read_metadata(make_wheel(tmp_path, "Some_Thing", "2.0", requires=["a>=1; extra == 'x'"],
                                                extras=["X"]))
    assert wheel.name == "some-thing" and wheel.provides_extras == {"x"}
    assert wheel.requires == (Requirement("a>=1; extra == 'x'"),)


def test_extra_wheels_are_copied_resolved_and_checked(tmp_path, index):
    built_on_kaggle = make_wheel(tmp_path / "kaggle", "gptqmodel", "7.6.0", requires=["logbar", "numpy==2.2.6"],
                                 tag="cp311-cp311-linux_x86_64")
    wrong_python = make_wheel(tmp_path / "kaggle", "other", "1.0", tag="cp312-cp312-linux_x86_64")
    index(make_wheel(index.src, "logbar", "0.4"))
    report = resolve(tmp_path, ["gptqmodel==7.6.0", "other"], extra_wheels=[built_on_kaggle, wrong_python])
    assert (tmp_path / "house" / built_on_kaggle.name).is_file()
    assert "gptqmodel" not in index.asked and "logbar" in index.asked
    gptq = next(f for f in report.files if f.name == "gptqmodel")
    assert gptq.required_by == ["(extra_wheels)", "(requested)"]
    assert report.excluded["numpy"] == ["gptqmodel (==2.2.6)"]
    assert report.problems == [f"{wrong_python.name}: its tags do not install on the target (cp311 "
                               f"{KAGGLE.platforms[0]})"]
    with pytest.raises(ValueError, match="is not a wheel file"):
        resolve(tmp_path, [], extra_wheels=[tmp_path / "missing.txt"])


def test_manifest_is_json_with_everything(tmp_path, index):
    index(make_wheel(index.src, "a", "1.0", requires=["numpy"]))
    report = resolve(tmp_path, ["a"])
    data = json.loads(wheelhouse.write_manifest(report, tmp_path / "wheelhouse.json").read_text())
    assert data["ok"] is True and data["files"][0]["filename"] == "a-1.0-py3-none-any.whl"
    assert data["excluded"] == {"numpy": ["a"]} and data["target"]["abi"] == "cp311"
    assert data["total_bytes"] == (tmp_path / "house" / "a-1.0-py3-none-any.whl").stat().st_size


# ---------------------------------------------------------------- lmsys_lib's requirements, offline pip env

def test_lmsys_requirements_reads_base_and_extras(tmp_path):
    wheel = make_wheel(tmp_path, "lmsys_lib", "0.1.0", extras=["quantize", "train", "dev"], requires=[
        "numpy>=1.26", 'tomli; python_version < "3.10"', 'gptqmodel==7.6.0; extra == "quantize"',
        'optimum>=2.0; extra == "quantize"', 'peft>=0.13; extra == "train"',
        'lmsys_lib[quantize]; extra == "dev"', 'pytest>=8; extra == "dev"'])
    assert wheelhouse.lmsys_requirements(wheel, extras=()) == ["numpy>=1.26"]
    assert wheelhouse.lmsys_requirements(wheel) == ["numpy>=1.26", "gptqmodel==7.6.0", "optimum>=2.0"]
    assert wheelhouse.lmsys_requirements(wheel, extras=["dev"]) == [  # the self-reference brings [quantize]
        "numpy>=1.26", "gptqmodel==7.6.0", "optimum>=2.0", "pytest>=8"]
    on_39 = wheelhouse.lmsys_requirements(wheel, extras=(), target=Target.kaggle("3.9"))
    assert on_39 == ["numpy>=1.26", "tomli"]
    with pytest.raises(ValueError, match=r"lmsys-lib provides no extra \['gpu'\]"):
        wheelhouse.lmsys_requirements(wheel, extras=["gpu"])


def test_offline_pip_env_sees_only_find_links(monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///opt/pypi/simple")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    env = wheelhouse.offline_pip_env()
    pip_vars = {k for k in env if k.startswith("PIP_")}
    assert pip_vars == {"PIP_CONFIG_FILE", "PIP_NO_INDEX", "PIP_DISABLE_PIP_VERSION_CHECK"}
    assert env["PIP_CONFIG_FILE"] == "/dev/null" and "PYTHONPATH" not in env


def test_wheelhouse_imports_without_torch():
    code = ("import sys, lmsys_lib.wheelhouse\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_install_check_refuses_a_used_folder(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        wheelhouse.install_check(tmp_path, tmp_path / "venv")


# ---------------------------------------------------------------- the real thing (registry + pip)

@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    wheel = wheelhouse.build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))
    assert wheel.name == "lmsys_lib-0.1.0-py3-none-any.whl"
    return wheel


def _tiny_train_csv(path: Path) -> Path:
    header = ["id", "model_a", "model_b", "prompt", "response_a", "response_b", "winner_model_a",
              "winner_model_b", "winner_tie"]
    rows = [[1, "a", "b", '["Hi"]', '["Hello"]', '["Hey"]', 1, 0, 0],
            [2, "a", "b", '["2+2?", null]', '["4", "x"]', '["5", "y"]', 0, 0, 1]]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


@pytest.mark.slow
def test_offline_install_from_the_wheelhouse(tmp_path, built_wheel):
    start = time.perf_counter()
    house = tmp_path / "house"
    report = wheelhouse.build_wheelhouse(house, wheelhouse.lmsys_requirements(built_wheel, extras=()),
                                         Target.local(), exclude=frozenset(), extra_wheels=[built_wheel],
                                         log=lambda line: None)
    assert report.ok, report.summary()
    names = {f.name for f in report.files}
    assert {"lmsys-lib", "numpy", "pandas", "transformers", "tokenizers", "packaging"} <= names
    assert "torch" not in names and not report.sdists
    wheelhouse.write_requirements(house, built_wheel, (), Target.local())  # what the notebooks install with -r
    check = wheelhouse.install_check(house, tmp_path / "venv", requirements=wheelhouse.requirements_file())
    venv = (tmp_path / "venv").resolve()
    assert all(Path(f).is_relative_to(venv) for f in check.module_files.values())
    data = _tiny_train_csv(tmp_path / "train.csv")
    probe = ("from lmsys_lib.parsing import read_competition; r = read_competition(__import__('sys').argv[1]); "
             "print(r.kind, len(r.frame), r.frame.label.tolist())")
    out = subprocess.run([str(check.python), "-I", "-c", probe, str(data)], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    assert out.split() == ["train", "2", "[0,", "2]"]
    validate = subprocess.run([str(venv / "bin" / "lmsys"), "validate", str(data)], capture_output=True,
                              text=True, cwd=tmp_path, env=wheelhouse.offline_pip_env())
    assert validate.returncode == 0 and "2 rows — OK" in validate.stdout, validate.stderr
    print(f"\nwheelhouse + offline install: {time.perf_counter() - start:.0f} s, "
          f"{len(report.files)} files, {report.total_bytes / 2**20:.0f} MiB")


@pytest.mark.slow
def test_install_check_sees_nothing_but_the_wheelhouse(tmp_path, monkeypatch):
    # tqdm is on the index and, here, in a find-links folder from the environment: it must not be used
    make_wheel(tmp_path / "elsewhere", "tqdm", "4.67.0")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "elsewhere"))
    make_wheel(tmp_path / "house", "needs-tqdm", "1.0", requires=["tqdm"])
    with pytest.raises(wheelhouse.PipError, match=r"offline pip install(.|\n)*No matching distribution found for tqdm"):
        wheelhouse.install_check(tmp_path / "house", tmp_path / "venv", package="needs-tqdm")


@pytest.mark.slow
def test_kaggle_wheelhouse_for_the_quantize_extra(tmp_path, built_wheel):
    requirements = wheelhouse.lmsys_requirements(built_wheel, extras=("quantize",))
    assert "gptqmodel==7.6.0" in requirements and "torch" not in " ".join(requirements)
    report = wheelhouse.build_wheelhouse(tmp_path / "house", requirements, KAGGLE, log=lambda line: None)
    files = {f.name: f for f in report.files}
    assert "torch" not in files and not any(n.startswith("nvidia-") for n in files)
    assert not list((tmp_path / "house").glob("torch-*"))
    assert files["optimum"].kind == "wheel"
    # gptqmodel 7.6.0 has no wheel on the index: its sdist is pure Python, so the wheel is built here
    assert files["gptqmodel"].built_from == "gptqmodel-7.6.0.tar.gz"
    assert files["gptqmodel"].filename == "gptqmodel-7.6.0-py3-none-any.whl"
    assert all("compile it offline" in s and "extra_wheels" in s for s in report.sdists)
    assert {"transformers", "numpy", "torch"} <= set(report.excluded)
    assert "torch" in report.excluded and "gptqmodel (>=2.8.0)" in report.excluded["torch"]
    for f in report.files:
        assert f.kind == "sdist" or KAGGLE.fits(f.filename), f.filename


# ---------------------------------------------------------------- the image: versions, the gptqmodel choice, the live check

# gptqmodel's own Requires-Dist (PyPI metadata of each release), the parts that touch the image
GPTQMODEL = {
    "7.7.0": ["accelerate>=1.15.0", 'numpy>=2.5.4; python_version >= "3.12"', "torch>=2.14.1",
              "transformers>=5.20.2", "protobuf>=7.36.2", "pypcre>=0.6.4"],
    "7.6.0": ["accelerate>=1.13.0", 'numpy==2.2.6; python_version < "3.14"', "torch>=2.8.0",
              "transformers>=5.14.0", "protobuf>=7.34.0", "torchao>=0.18.0"],
    "7.3.6": ["accelerate>=1.13.0", 'numpy==2.2.6; python_version < "3.14"', "torch>=2.8.0",
              "transformers>=5.14.0", "protobuf>=7.34.0", "torchao>=0.16.0"],
    "6.0.3": None,  # its sdist's metadata is dynamic: unknown without a build
}


def _image(**versions):
    return wheelhouse.Image("test image", "3.12", "test", "2026-12-02",
                            {k: (v, "test") for k, v in versions.items()})


def test_gptqmodel_is_chosen_for_the_image_table():
    kaggle = wheelhouse.KAGGLE_IMAGE  # the recorded Kaggle image: protobuf 5.29.5 is pinned there
    target = Target.kaggle()
    assert target.python_version == kaggle.python == "3.12" and target.abi == "cp312"
    choice = wheelhouse.choose_version("gptqmodel", GPTQMODEL, GPTQMODEL.get, kaggle, target)
    assert choice.version is None
    assert "torch>=2.14.1 (the image has torch 2.10)" in choice.rejected["7.7.0"]
    assert choice.rejected["7.6.0"] == ["protobuf>=7.34.0 (the image has protobuf 5.29.5)"]
    assert "dynamic metadata" in choice.rejected["6.0.3"][0]
    newer = _image(torch="2.10.0", protobuf="7.34.1", numpy="2.2.6")
    choice = wheelhouse.choose_version("gptqmodel", GPTQMODEL, GPTQMODEL.get, newer, target)
    assert choice.version == "7.6.0" and "transformers>=5.14.0 (the image's transformers: unknown)" in choice.unchecked
    newest = _image(torch="2.15.0", protobuf="7.40", numpy="2.5.4", transformers="5.30", accelerate="1.16")
    assert wheelhouse.choose_version("gptqmodel", GPTQMODEL, GPTQMODEL.get, newest, target).version == "7.7.0"
    fit = wheelhouse.fit_to_image(["gptqmodel==7.6.0", "optimum>=2.0"], kaggle, target,
                                  versions_of=lambda name, t: list(GPTQMODEL), requirements_for=lambda n, t: GPTQMODEL.get)
    assert fit.requirements == ["gptqmodel==7.6.0", "optimum>=2.0"] and "no gptqmodel release fits" in fit.problems[0]
    fit = wheelhouse.fit_to_image(["gptqmodel==7.6.0"], kaggle, target, allow_replace=("protobuf",),
                                  versions_of=lambda name, t: list(GPTQMODEL), requirements_for=lambda n, t: GPTQMODEL.get)
    assert fit.requirements == ["gptqmodel==7.6.0"] and not fit.problems and "chose gptqmodel 7.6.0" in fit.notes[0]
    with pytest.raises(ValueError, match="never replaced"):
        wheelhouse.fit_to_image([], kaggle, target, allow_replace=("torch",))


def test_a_wheelhouse_that_would_replace_what_the_image_ships_is_refused(tmp_path, index):
    index(make_wheel(index.src, "needs-new-protobuf", "1.0", requires=["protobuf>=7.34", "numpy"]))
    report = resolve(tmp_path, ["needs-new-protobuf"])
    assert report.image_needs["protobuf"] == [["needs-new-protobuf", ">=7.34"]]
    misfits, unchecked = wheelhouse.replaced_by(report, wheelhouse.KAGGLE_IMAGE)
    assert misfits == ["needs-new-protobuf needs protobuf>=7.34, the image has 5.29.5: pip would replace it "
                       "(refused; --allow-replace protobuf ships it instead)"]
    assert unchecked == []  # numpy is asked for without a version
    shipped = resolve(tmp_path / "b", ["needs-new-protobuf"], exclude=KAGGLE_SHIPS - {"protobuf"})
    assert "protobuf" not in shipped.image_needs and wheelhouse.replaced_by(shipped, wheelhouse.KAGGLE_IMAGE)[0] == []


def test_the_image_table_round_trips_and_a_bad_one_names_its_file(tmp_path):
    path = tmp_path / "image.json"
    live = wheelhouse.live_image()
    path.write_text(json.dumps(live.to_dict()))
    again = wheelhouse.Image.read(path)
    assert again.python == live.python and again.version("packaging") == live.version("packaging") is not None
    assert again.version("torch")  # this machine's torch, read by importlib.metadata
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match=f"{path}: not an image table"):
        wheelhouse.Image.read(path)


def test_the_live_check_fails_in_seconds_with_the_exact_mismatch(tmp_path):
    lines: list[str] = []
    assert wheelhouse.check_live(tmp_path / "absent", log=lines.append) is None and "skipped" in lines[0]
    python = ".".join(platform.python_version().split(".")[:2])
    manifest = {"target": {"python_version": python},
                "image_needs": {"packaging": [["lmsys_lib", ">=20"]], "pyyaml": [["gptqmodel", ""]]}}
    (tmp_path / "wheelhouse.json").write_text(json.dumps(manifest))
    assert wheelhouse.check_live(tmp_path, log=lines.append) is not None and "fits this image" in lines[-1]
    assert '"packaging"' in lines[-2]  # the live versions are printed first, as JSON
    manifest["image_needs"]["packaging"] = [["optimum", ">=999"]]
    manifest["target"]["python_version"] = "3.99"
    (tmp_path / "wheelhouse.json").write_text(json.dumps(manifest))
    with pytest.raises(wheelhouse.ImageMismatch, match=r"Python .*built for 3\.99.*optimum needs packaging>=999; "
                                                        r"this image has"):
        wheelhouse.check_live(tmp_path, log=lambda line: None)


def test_the_live_check_of_one_extra_ignores_what_another_extra_needs(tmp_path):
    """Notebook 00 installs `lmsys_lib[]`: a gptqmodel requirement on the image (the quantize extra's) is not its."""
    manifest = {"target": {"python_version": ".".join(platform.python_version().split(".")[:2])},
                "files": [{"name": "gptqmodel", "required_by": ["(requested)"]},
                          {"name": "logbar", "required_by": ["gptqmodel"]}],
                "image_needs": {"packaging": [["logbar", ">=999"]], "pip": [["(requested)", ">=1"]]}}
    (tmp_path / "wheelhouse.json").write_text(json.dumps(manifest))
    (tmp_path / "requirements.txt").write_text("# base\npip>=1\n")
    (tmp_path / "requirements-quantize.txt").write_text("pip>=1\ngptqmodel==7.6.0\n")
    assert wheelhouse.check_live(tmp_path, extra="", log=lambda line: None) is not None
    with pytest.raises(wheelhouse.ImageMismatch, match="logbar needs packaging>=999"):
        wheelhouse.check_live(tmp_path, extra="quantize", log=lambda line: None)
    with pytest.raises(wheelhouse.ImageMismatch, match="logbar needs packaging>=999"):
        wheelhouse.check_live(tmp_path, log=lambda line: None)  # no extra named: everything the folder relies on


def test_the_chosen_pin_replaces_the_wheels_own_in_every_requirements_file():
    fit = wheelhouse.ImageFit(["gptqmodel==7.7.0"], [], [], {"gptqmodel": "gptqmodel==7.7.0"})
    assert fit.apply(["numpy>=1.26", "gptqmodel==7.6.0", "optimum>=2.0"]) == \
        ["numpy>=1.26", "gptqmodel==7.7.0", "optimum>=2.0"]
