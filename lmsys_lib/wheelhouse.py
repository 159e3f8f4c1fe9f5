"""The offline wheelhouse: every file ``pip install --no-index --find-links DIR lmsys_lib`` needs on a Kaggle
kernel with internet off, and nothing the kernel's image already ships.

Contract:
- ``build_wheel`` builds the lmsys_lib wheel from a clean copy of the project (stale ``build/`` output never
  leaks into it, and the checkout gains no build folders).
- ``build_wheelhouse`` resolves for a *target* interpreter and platform (``Target``), not the running one:
  markers are evaluated in the target's PEP 508 environment and every file comes from
  ``pip download --no-deps`` with the target's ``--python-version/--platform/--implementation/--abi``.
  Wheels first; a distribution with no wheel for the target falls back to its sdist. A pure-Python sdist
  is built here into its ``*-none-any`` wheel (what Kaggle's isolated build would produce, minus the need
  for build tools offline; ``WheelFile.built_from`` says so); any other sdist stays and is listed in
  ``report.sdists`` with how to replace it (Kaggle would have to compile it offline).
- ``install_check`` proves the offline install: a fresh venv whose pip sees only the wheelhouse (no config
  file, no index, no other find-links), then imports run from a temporary folder and must come from the venv.

Invariants:
- the wheelhouse never holds torch: a torch requirement that is not excluded raises ``ValueError`` (a wheel
  from the index would replace Kaggle's CUDA build with whatever the index serves);
- one file per distribution; a name met again is checked against the version already chosen, and a
  mismatch is a conflict naming both requirers. This is a small resolver, not pip's: first specifier met
  wins, no backtracking — a conflict is reported, never solved (pin it in the requirements);
- names in ``exclude`` (default ``KAGGLE_SHIPS``) are never downloaded nor recursed into; the report keeps
  who required them and with what specifier, since the image's version must satisfy those.

This module never imports torch; it needs only the standard library and ``packaging``.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.parser
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from packaging import tags
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REQUESTED = "(requested)"
EXTRA_WHEEL = "(extra_wheels)"
# Refused whatever `exclude` says: Kaggle's torch is a CUDA build matched to its drivers and to torchvision /
# triton; a torch wheel in the wheelhouse would be installed over it (or be GBs of the wrong CUDA build).
REFUSED = frozenset({"torch"})

# What Kaggle's GPU image already ships (canonical names; a trailing * is a prefix). Excluding them keeps
# the dataset small and, above all, never replaces Kaggle's CUDA torch stack. When unsure, leave a name out:
# a missing wheel fails the offline install, a superfluous one only costs space (pip keeps an installed
# version that satisfies the specifier). Users override with `exclude=`.
KAGGLE_SHIPS = frozenset({
    # the CUDA stack: never replace it
    "torch", "torchvision", "torchaudio", "triton", "nvidia-*",
    # Hugging Face
    "transformers", "tokenizers", "accelerate", "peft", "safetensors", "huggingface-hub", "datasets",
    "sentencepiece",
    # scientific Python
    "numpy", "pandas", "pyarrow", "matplotlib", "scipy", "scikit-learn", "sympy", "mpmath", "networkx",
    "joblib", "threadpoolctl", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing",
    "python-dateutil", "pytz", "tzdata", "six", "pillow",
    # everyday dependencies of the above
    "tqdm", "jinja2", "markupsafe", "requests", "urllib3", "idna", "certifi", "charset-normalizer",
    "protobuf", "packaging", "filelock", "pyyaml", "regex", "fsspec", "psutil", "dill", "multiprocess",
    "xxhash", "aiohttp", "typing-extensions", "setuptools", "wheel", "pip",
})


# ---------------------------------------------------------------- the image the wheelhouse installs into

@dataclasses.dataclass(frozen=True)
class Image:
    """What a machine image ships: Python and package versions, each with where the number comes from.

    ``packages``: canonical name → (version or None when not known, source). A None version is never taken
    as satisfying or violating a requirement: it is reported as unchecked, for the live check to settle.
    """

    name: str
    python: str
    python_source: str
    date: str
    packages: dict[str, tuple[str | None, str]]

    def version(self, name: str) -> str | None:
        entry = self.packages.get(canonicalize_name(name))
        return entry[0] if entry else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "date": self.date, "python": [self.python, self.python_source],
                "packages": {k: list(v) for k, v in sorted(self.packages.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "image") -> Image:
        try:
            python, python_source = data["python"]
            packages = {canonicalize_name(k): (v[0], v[1]) for k, v in data["packages"].items()}
            return cls(str(data["name"]), str(python), str(python_source), str(data["date"]), packages)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{where}: not an image table ({err}); expected {{name, date, python: [version, "
                             "source], packages: {{name: [version, source]}}}} — as live_image() prints") from None

    @classmethod
    def read(cls, path: str | Path) -> Image:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), str(path))


_DOCKER = "Kaggle/docker-python@78aaa43 (2026-08-12)"
# Kaggle's GPU image as far as its public build files say; versions its base image (Colab's) decides are not
# written there and stay None until a kernel prints them (notebook 05's first cell: `live_image()`).
KAGGLE_IMAGE = Image(
    name="Kaggle GPU image: docker-python 78aaa43 on Colab's runtime 20260514-060047_RC00",
    python="3.12", python_source=f"{_DOCKER} Dockerfile.tmpl: PACKAGE_PATH=/usr/local/lib/python3.12/dist-packages",
    date="2026-08-12",
    packages={
        "torch": ("2.10", f"inferred: {_DOCKER} kaggle_requirements.txt pins torchcodec==0.10.0 'compatible with "
                          "torch version', and torchcodec pairs 0.10 with torch 2.10"),
        "protobuf": ("5.29.5", f"{_DOCKER} Dockerfile.tmpl force-reinstalls protobuf==5.29.5 (b/468367647)"),
        "setuptools": (None, f"{_DOCKER} Dockerfile.tmpl: setuptools>=70.0,<82 (a range, not a version)"),
        "transformers": (None, f"{_DOCKER} kaggle_requirements.txt asks transformers>=5.0.0; the version "
                               "installed comes from Colab's base image"),
        "numpy": (None, "Colab's base image (not in Kaggle's build files)"),
        "accelerate": (None, "Colab's base image (not in Kaggle's build files)"),
        "peft": (None, "Colab's base image (not in Kaggle's build files)"),
        "safetensors": (None, "Colab's base image (not in Kaggle's build files)"),
    })


class ImageMismatch(RuntimeError):
    """The image's versions do not satisfy what the wheelhouse was built to rely on."""


def _pattern(name: str) -> str:
    """A name or ``prefix-*`` pattern the way names are compared (canonicalize_name would drop the ``*``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _fits(spec: str | SpecifierSet, have: str | None) -> bool | None:
    """Whether version ``have`` satisfies ``spec``; None when ``have`` is unknown (a local suffix such as
    ``+cu128`` is fine, a pre-release counts)."""
    if have is None:
        return None
    return SpecifierSet(str(spec)).contains(Version(have), prereleases=True)


def image_misfits(requirements: Iterable[str | Requirement], image: Image, target: Target | None = None,
                  shipped: Iterable[str] = KAGGLE_SHIPS) -> tuple[list[str], list[str]]:
    """The requirements on packages the image ships that its versions violate (pip would have to replace
    them), and those it cannot check (version unknown). Markers are evaluated for ``target``."""
    env = (target or Target.kaggle(image.python)).marker_environment()
    patterns = [_pattern(e) for e in shipped]
    misfits, unchecked = [], []
    for item in requirements:
        req = item if isinstance(item, Requirement) else Requirement(item)
        name = canonicalize_name(req.name)
        if (req.marker is not None and not req.marker.evaluate({**env, "extra": ""})) or \
                not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        have = image.version(name)
        fits = _fits(req.specifier, have)
        if fits is None and req.specifier:  # a bare name asks nothing of the version
            unchecked.append(f"{req} (the image's {name}: unknown)")
        elif fits is False:
            misfits.append(f"{req} (the image has {name} {have})")
    return misfits, unchecked


@dataclasses.dataclass
class VersionChoice:
    """The newest release of ``name`` whose requirements the image satisfies, and why newer ones were not."""

    name: str
    version: str | None
    rejected: dict[str, list[str]]
    unchecked: list[str]

    def explain(self) -> str:
        why = "; ".join(f"{v}: {', '.join(r)}" for v, r in self.rejected.items())
        if self.version is None:
            return f"no {self.name} release fits the image — {why or 'none found'}"
        return f"{self.name} {self.version}" + (f" (newer ones do not fit: {why})" if why else "")


def choose_version(name: str, versions: Iterable[str], requirements_of: Callable[[str], list[str] | None],
                   image: Image, target: Target | None = None, limit: int = 6,
                   shipped: Iterable[str] = KAGGLE_SHIPS) -> VersionChoice:
    """Try releases of ``name`` newest first (at most ``limit``: each costs a download); the first whose requirements fit ``image``
    wins. ``requirements_of(version)``: its Requires-Dist, or None when they cannot be read without a build
    (dynamic metadata) — such a release is skipped, with the reason."""
    rejected: dict[str, list[str]] = {}
    for version in sorted(set(versions), key=Version, reverse=True)[:limit]:
        if Version(version).is_prerelease:
            continue
        requires = requirements_of(version)
        if requires is None:
            rejected[version] = ["its requirements are unknown without building it (dynamic metadata)"]
            continue
        misfits, unchecked = image_misfits(requires, image, target, shipped)
        if not misfits:
            return VersionChoice(name, version, rejected, unchecked)
        rejected[version] = misfits
    return VersionChoice(name, None, rejected, [])


def index_versions(name: str, target: Target | None = None) -> list[str]:
    """The releases of ``name`` on the package index (``pip index versions`` with the target's interpreter and
    platform; releases with only an sdist are listed too — the download falls back to it)."""
    args = target.pip_args() if target else []
    out = _run(_pip("index", "versions", name, *args), f"pip index versions {name}").stdout
    found = re.search(r"Available versions:\s*(.+)", out)
    return [v.strip() for v in found.group(1).split(",")] if found else []


def index_requirements(name: str, target: Target) -> Callable[[str], list[str] | None]:
    """``requirements_of`` for ``choose_version``: downloads each release asked for (``--no-deps``, for
    ``target``) into a temporary folder and reads its metadata."""
    def requirements_of(version: str) -> list[str] | None:
        with tempfile.TemporaryDirectory() as tmp:
            path, _ = _download(f"{name}=={version}", target, Path(tmp))
            if path is None:
                return None
            meta = read_metadata(path)
            return None if meta.requires is None else [str(r) for r in meta.requires]
    return requirements_of


CHOOSABLE = ("gptqmodel",)  # pinned for this machine in pyproject; for an image, the newest release that fits it


@dataclasses.dataclass
class ImageFit:
    """``fit_to_image``'s answer: the requirements to resolve, what was chosen and why, what cannot be."""

    requirements: list[str]
    notes: list[str]
    problems: list[str]
    pins: dict[str, str] = dataclasses.field(default_factory=dict)  # name → the chosen "name==version"

    def apply(self, requirements: Sequence[str]) -> list[str]:
        """``requirements`` with the chosen pins in place of the names they re-pin."""
        return [self.pins.get(canonicalize_name(Requirement(r).name), r) for r in requirements]


def fit_to_image(requirements: Sequence[str], image: Image, target: Target, allow_replace: Iterable[str] = (),
                 versions_of: Callable[[str, Target], list[str]] = index_versions,
                 requirements_for: Callable[[str, Target], Callable[[str], list[str] | None]] = index_requirements,
                 choosable: Sequence[str] = CHOOSABLE) -> ImageFit:
    """Re-pin each ``choosable`` requirement to the newest release whose own requirements ``image`` satisfies
    (``choose_version``); a name with no such release is a problem that names each release's misfit. Names in
    ``allow_replace`` are not held against a release (they will be shipped, replacing the image's)."""
    replace = {canonicalize_name(n) for n in allow_replace}
    pins: dict[str, str] = {}
    if replace & REFUSED:
        raise ValueError(f"--allow-replace {sorted(replace & REFUSED)}: the image's CUDA torch is never replaced")
    shipped = set(KAGGLE_SHIPS) - replace
    fitted, notes, problems = [], [], []
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in choosable:
            fitted.append(text)
            continue
        choice = choose_version(name, versions_of(name, target), requirements_for(name, target), image, target,
                                shipped=shipped)
        if choice.version is None:
            problems.append(choice.explain() + " — build for a newer image (--image, from a kernel's "
                            "live_image()), or ship what it lacks in the wheelhouse (--allow-replace NAME …: "
                            "it then replaces the image's copy in that kernel)")
            fitted.append(text)
            continue
        fitted.append(pins.setdefault(name, f"{req.name}=={choice.version}"))
        notes.append(f"chose {choice.explain()}" + (f"; unchecked: {', '.join(choice.unchecked)}"
                                                      if choice.unchecked else ""))
    return ImageFit(fitted, notes, problems, pins)


def replaced_by(report: WheelhouseReport, image: Image) -> tuple[list[str], list[str]]:
    """After a resolution: every requirement on a package left to the image that the image's version
    violates (pip would replace it at install time: refused), and those it cannot check (version unknown)."""
    misfits, unchecked = [], []
    for name, needs in sorted(report.image_needs.items()):
        have = image.version(name)
        for requirer, spec in needs:
            fits = _fits(spec, have) if spec else True
            if fits is None:
                unchecked.append(f"{requirer} needs {name}{spec} (the image's version is unknown: the kernel's "
                                 "first cell checks it)")
            elif not fits:
                misfits.append(f"{requirer} needs {name}{spec}, the image has {have}: pip would replace it "
                               f"(refused; --allow-replace {name} ships it instead)")
    return misfits, unchecked


def live_image(names: Iterable[str] | None = None) -> Image:
    """This machine as an image table: the running Python and the installed version of every package
    ``KAGGLE_SHIPS`` names (prefixes expanded over what is installed). Run in a kernel, its JSON is what
    ``lmsys kaggle build --image`` takes."""
    from importlib import metadata

    installed: dict[str, str] = {}
    for dist in metadata.distributions():  # sys.path order: the first of a name is the one imported
        if dist.metadata["Name"]:
            installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    wanted = sorted(names or KAGGLE_SHIPS)
    found = {n: v for n, v in installed.items() if any(fnmatch.fnmatchcase(n, w) for w in wanted)}
    where = f"read on {platform.node() or 'this machine'} with importlib.metadata"
    return Image(name=f"live: {platform.platform()}", python=platform.python_version(), python_source=where,
                 date=datetime.date.today().isoformat(),
                 packages={n: (v, where) for n, v in sorted(found.items())})


def requirements_file(extra: str = "") -> str:
    """The file in the wheelhouse listing what ``lmsys_lib[extra]`` needs (the chosen pins applied)."""
    return f"requirements-{extra}.txt" if extra else "requirements.txt"


def write_requirements(folder: str | Path, wheel: str | Path, extras: Sequence[str], target: Target,
                       fit: ImageFit | None = None, note: str = "") -> list[Path]:
    """One ``requirements_file`` per extra ("" the base) in ``folder``: the wheel's requirements for it on
    ``target``, with ``fit``'s pins applied — what the notebooks install with ``pip install -r`` after the
    wheel itself (``--no-deps``). Files of an earlier build are removed first."""
    folder = Path(folder)
    for old in folder.glob("requirements*.txt"):
        old.unlink()
    paths = []
    for extra in dict.fromkeys(("", *extras)):
        listing = lmsys_requirements(wheel, extras=(extra,) if extra else (), target=target)
        listing = fit.apply(listing) if fit else listing
        path = folder / requirements_file(extra)
        path.write_text(f"# lmsys_lib[{extra}] {note}\n" + "\n".join(listing) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _needs_for(manifest: dict[str, Any], requested: set[str]) -> dict[str, list[list[str]]]:
    """``image_needs`` restricted to what installing ``requested`` pulls in (the manifest's requirer graph)."""
    children: dict[str, set[str]] = {}
    for f in manifest.get("files", []):
        for parent in f.get("required_by", []):
            children.setdefault(canonicalize_name(parent) if not parent.startswith("(") else parent,
                                set()).add(canonicalize_name(f["name"]))
    seen, todo = set(requested), list(requested)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    out: dict[str, list[list[str]]] = {}
    for name, needs in manifest.get("image_needs", {}).items():
        kept = [n for n in needs if canonicalize_name(n[0]) in seen or (n[0] == REQUESTED and name in requested)]
        if kept:
            out[name] = kept
    return out


def check_live(wheelhouse_dir: str | Path | None, extra: str | None = None,
               log: Callable[[str], None] = print) -> Image | None:
    """A kernel's first check: print this machine's versions (Python, the shipped packages) as JSON, then
    compare them with what the wheelhouse in ``wheelhouse_dir`` was built to rely on (``wheelhouse.json``:
    the Python it targets and every requirement on a package it left to the image — of ``lmsys_lib[extra]``
    only when ``extra`` is given: "" the base, "train", "quantize"). Raises ``ImageMismatch``
    naming each mismatch — in seconds, before any model loads. Without the folder (not on Kaggle) it says so
    and returns None."""
    folder = Path(wheelhouse_dir) if wheelhouse_dir else None
    if folder is None or not (folder / "wheelhouse.json").is_file():
        log(f"no wheelhouse at {folder}: the image check is skipped (not a Kaggle kernel with the wheels attached)")
        return None
    live = live_image()
    log("this image (pass it to `lmsys kaggle build --image FILE` to build for it):\n"
        + json.dumps(live.to_dict(), indent=1))
    built = json.loads((folder / "wheelhouse.json").read_text(encoding="utf-8"))
    wanted_python = str(built.get("target", {}).get("python_version", ""))
    problems = []
    if wanted_python and not live.python.startswith(wanted_python + "."):
        problems.append(f"Python {live.python}, but the wheelhouse was built for {wanted_python} "
                        f"(lmsys kaggle build --python {'.'.join(live.python.split('.')[:2])})")
    needs_of = built.get("image_needs", {})
    listing = folder / requirements_file(extra or "")
    if extra is not None and listing.is_file():
        requested = {canonicalize_name(Requirement(line).name) for line in listing.read_text().splitlines()
                     if line.strip() and not line.startswith("#")}
        needs_of = _needs_for(built, requested)
    for name, needs in sorted(needs_of.items()):
        have = live.version(name)
        for requirer, spec in needs:
            fits = _fits(spec, have)
            if fits is None:
                problems.append(f"{requirer} needs {name}{spec}, which this image does not have")
            elif not fits:
                problems.append(f"{requirer} needs {name}{spec}; this image has {have}")
    if problems:
        raise ImageMismatch(f"the wheelhouse {folder} does not fit this image ({len(problems)}): "
                            + "; ".join(problems) + " — rebuild it for this image: save the JSON above as "
                            "image.json and run `lmsys kaggle build --image image.json`")
    log(f"the wheelhouse {folder} fits this image")
    return live


# ---------------------------------------------------------------- the target interpreter and platform

@dataclasses.dataclass(frozen=True)
class Target:
    """Where the wheelhouse will be installed: what pip's download options and PEP 508 markers see.

    ``platforms`` are pip ``--platform`` tags, each taken literally: pip widens only manylinux2014/2010, so
    ``manylinux_2_28`` does not admit a ``manylinux_2_27`` wheel — list every glibc level you accept.
    """

    python_version: str  # "3.11"
    platforms: tuple[str, ...]
    implementation: str = "cp"
    abi: str = "cp311"
    python_full_version: str = ""  # marker python_full_version; "" → python_version + ".0"

    @classmethod
    def local(cls) -> Target:
        """The running interpreter and machine."""
        first = next(iter(tags.sys_tags()))  # e.g. cp311-cp311-manylinux_2_36_x86_64: the best fit
        return cls(python_version=f"{sys.version_info[0]}.{sys.version_info[1]}",
                   platforms=tuple(dict.fromkeys(tags.platform_tags())), implementation=tags.interpreter_name(),
                   abi=first.abi, python_full_version=platform.python_version())

    @classmethod
    def kaggle(cls, python_version: str | None = None, glibc: str = "2.35") -> Target:
        """Kaggle's GPU image: CPython (``KAGGLE_IMAGE.python`` unless given) on manylinux x86_64 (glibc 2.35).

        The image moves: check ``python --version`` (and ``ldd --version``) in a kernel — notebook 05's first
        cell prints them — and pass what it prints, e.g. ``lmsys kaggle build --python 3.13`` or ``--image``.
        """
        python_version = python_version or KAGGLE_IMAGE.python
        return cls(python_version=python_version, platforms=(*_manylinux_tags(glibc, "x86_64"), "linux_x86_64"),
                   implementation="cp", abi="cp" + python_version.replace(".", ""))

    def marker_environment(self, extra: str = "") -> dict[str, str]:
        """The PEP 508 environment markers are evaluated in for this target (every key set, so nothing
        falls back to the running machine's values)."""
        system, sys_platform, os_name, machine = _platform_facts(self.platforms[0])
        full = self.python_full_version or f"{self.python_version}.0"
        cpython = self.implementation == "cp"
        return {
            "implementation_name": "cpython" if cpython else self.implementation,
            "implementation_version": full, "os_name": os_name, "platform_machine": machine,
            "platform_release": "", "platform_system": system, "platform_version": "",
            "python_full_version": full, "platform_python_implementation": "CPython" if cpython else "",
            "python_version": self.python_version, "sys_platform": sys_platform, "extra": extra,
        }

    def pip_args(self) -> list[str]:
        """``pip download`` options selecting files for this target."""
        args = ["--python-version", self.python_version, "--implementation", self.implementation,
                "--abi", self.abi]
        for tag in self.platforms:
            args += ["--platform", tag]
        return args

    def fits(self, wheel_filename: str) -> bool:
        """Whether a wheel's tags install on this target."""
        version = tuple(int(p) for p in self.python_version.split("."))
        interpreter = f"{self.implementation}{self.python_version.replace('.', '')}"
        supported = set(tags.compatible_tags(version, interpreter, self.platforms))
        if self.implementation == "cp":
            supported |= set(tags.cpython_tags(version, [self.abi], self.platforms))
        return bool(supported & set(parse_wheel_filename(wheel_filename)[3]))


def _manylinux_tags(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a system with this glibc runs, newest first, legacy aliases included (the order
    of ``packaging.tags.platform_tags`` on such a machine)."""
    major, minor = (int(part) for part in glibc.split(".")[:2])
    aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    out = []
    for m in range(minor, 4, -1):
        out.append(f"manylinux_{major}_{m}_{arch}")
        if m in aliases:
            out.append(f"{aliases[m]}_{arch}")
    return out


def _platform_facts(tag: str) -> tuple[str, str, str, str]:
    """(platform_system, sys_platform, os_name, platform_machine) for a platform tag."""
    machine = next((m for m in ("x86_64", "aarch64", "i686", "ppc64le", "s390x", "armv7l", "arm64",
                                "universal2", "amd64", "win32") if tag.endswith(m)), tag.rsplit("_", 1)[-1])
    if tag.startswith("macosx"):
        return "Darwin", "darwin", "posix", machine
    if tag.startswith("win"):
        return "Windows", "win32", "nt", {"amd64": "AMD64", "win32": "x86"}.get(machine, machine.upper())
    return "Linux", "linux", "posix", machine


# ---------------------------------------------------------------- reading metadata from dist files

@dataclasses.dataclass(frozen=True)
class DistMetadata:
    """What the resolver needs from a wheel's METADATA or an sdist's PKG-INFO."""

    name: str  # canonical
    version: str
    requires: tuple[Requirement, ...] | None  # None: unknown (sdist PKG-INFO older than 2.2, or dynamic)
    provides_extras: frozenset[str]


def read_metadata(path: str | Path) -> DistMetadata:
    """Name, version, Requires-Dist and Provides-Extra of a wheel (.whl) or sdist (.tar.gz / .zip)."""
    path = Path(path)
    text = _wheel_metadata_text(path) if path.name.endswith(".whl") else _sdist_pkg_info(path)
    headers = email.parser.HeaderParser().parsestr(text)
    requires = headers.get_all("Requires-Dist") or []
    parsed = tuple(_parse_requirement(r, path.name) for r in requires)
    extras = frozenset(canonicalize_name(e) for e in headers.get_all("Provides-Extra") or ())
    known = path.name.endswith(".whl") or _static_requires(headers)
    return DistMetadata(name=canonicalize_name(headers["Name"]), version=str(headers["Version"]),
                        requires=parsed if known or requires else None, provides_extras=extras)


def _static_requires(headers: Any) -> bool:
    """PEP 643: an sdist's PKG-INFO (metadata 2.2+) is authoritative unless the field is marked Dynamic."""
    version = Version(headers.get("Metadata-Version", "1.0"))
    dynamic = {d.strip().lower() for d in headers.get_all("Dynamic") or ()}
    return version >= Version("2.2") and "requires-dist" not in dynamic


def _parse_requirement(text: str, source: str) -> Requirement:
    try:
        return Requirement(text)
    except InvalidRequirement as err:
        raise ValueError(f"{source}: unreadable Requires-Dist {text!r}: {err}") from err


def _wheel_metadata_text(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise ValueError(f"{path.name}: expected one <name>.dist-info/METADATA, found {names}")
        return archive.read(names[0]).decode("utf-8")


def _sdist_pkg_info(path: Path) -> str:
    """The top-level PKG-INFO (``<name>-<version>/PKG-INFO``), not an egg-info copy deeper down."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/PKG-INFO")]
            if names:
                return archive.read(names[0]).decode("utf-8")
    else:
        with tarfile.open(path) as archive:
            members = [m for m in archive.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
            handle = archive.extractfile(members[0]) if members else None
            if handle is not None:
                return handle.read().decode("utf-8")
    raise ValueError(f"{path.name}: no <name>-<version>/PKG-INFO inside")


# ---------------------------------------------------------------- the report

@dataclasses.dataclass
class WheelFile:
    """One file of the wheelhouse."""

    name: str  # canonical distribution name
    version: str
    filename: str
    kind: str  # "wheel" or "sdist"
    required_by: list[str]
    size_bytes: int
    built_from: str = ""  # the sdist this pure-Python wheel was built from, here


@dataclasses.dataclass
class WheelhouseReport:
    """What ``build_wheelhouse`` put in ``out_dir`` and why; ``ok`` is False on conflicts or problems."""

    out_dir: Path
    target: Target
    files: list[WheelFile] = dataclasses.field(default_factory=list)
    excluded: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # name → ["requirer (spec)"]
    image_needs: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)  # name → [[requirer, spec]]
    skipped_by_marker: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # requirement → requirers
    sdists: list[str] = dataclasses.field(default_factory=list)
    conflicts: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    other_files: list[str] = dataclasses.field(default_factory=list)  # in out_dir, not from this resolution

    @property
    def ok(self) -> bool:
        return not (self.conflicts or self.problems)

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(out_dir=str(self.out_dir), ok=self.ok, total_bytes=self.total_bytes)
        return data

    def summary(self) -> str:
        """A few readable lines: size, what is excluded and why, and every sdist, conflict and problem."""
        n_sdist = sum(f.kind == "sdist" for f in self.files)
        lines = [f"wheelhouse {self.out_dir} for {self.target.abi} {self.target.platforms[0]}: "
                 f"{len(self.files)} files ({n_sdist} sdists), {self.total_bytes / 2**20:.1f} MiB"]
        if self.excluded:
            shipped = "; ".join(f"{name} ← {', '.join(who)}" for name, who in sorted(self.excluded.items()))
            lines.append(f"  excluded (the target ships them; its versions must satisfy): {shipped}")
        if self.skipped_by_marker:
            lines.append(f"  skipped by marker: {', '.join(sorted(self.skipped_by_marker))}")
        built = [f"{f.filename} (from {f.built_from})" for f in self.files if f.built_from]
        if built:
            lines.append(f"  built here from pure-Python sdists: {', '.join(built)}")
        if self.other_files:
            lines.append("  other files in the folder (not from this resolution: the project's wheel, or stale): "
                         + ", ".join(self.other_files))
        lines += [f"  SDIST {s}" for s in self.sdists]
        sdists = [f"'{f.name}=={f.version}'" for f in self.files if f.kind == "sdist"]
        if sdists:
            lines.append(f"  to replace every sdist, in a Kaggle session with internet on: "
                         f"pip wheel --no-deps {' '.join(sdists)} -w wheels/  (then extra_wheels=wheels/*.whl)")
        lines += [f"  CONFLICT {c}" for c in self.conflicts]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        verdict = f"NOT OK: {len(self.conflicts)} conflicts, {len(self.problems)} problems"
        lines.append("  ok" if self.ok else f"  {verdict}")
        return "\n".join(lines)


def write_manifest(report: WheelhouseReport, path: str | Path) -> Path:
    """The report as JSON (``wheelhouse.json`` beside the wheels)."""
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------- pip

class PipError(RuntimeError):
    """A pip (or venv) subprocess failed; the message ends with the tail of its output."""


def _run(cmd: Sequence[str], what: str, env: dict[str, str] | None = None,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise PipError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                       f"{_tail(proc.stderr + proc.stdout)}")
    return proc


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _pip(*args: str) -> list[str]:
    # A plain `python -m pip` subprocess: the user's pip configuration (index, find-links, cache) applies.
    return [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]


def build_wheel(project_dir: str | Path, out_dir: str | Path) -> Path:
    """Build the project's wheel into ``out_dir`` with ``pip wheel --no-deps``; returns the wheel's path.

    Builds from a copy without build artefacts. ``--no-build-isolation`` when setuptools and wheel are
    importable, so it works offline; otherwise pip's isolated build (which needs the index). Raises
    ``PipError`` with the tail of pip's output.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    offline = find_spec("setuptools") is not None and find_spec("wheel") is not None
    with tempfile.TemporaryDirectory(prefix="lmsys-wheel-") as tmp:
        source = Path(tmp) / "src"
        shutil.copytree(project_dir, source, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "runs", "__pycache__", ".venv", ".*_cache", ".hypothesis"))
        flags = ["--no-build-isolation"] if offline else []
        proc = _run(_pip("wheel", "--no-deps", *flags, "-w", str(out_dir), str(source)), "pip wheel")
    names = re.findall(r"filename=(\S+\.whl)", proc.stdout)
    if not names or not (out_dir / names[-1]).is_file():
        raise PipError(f"pip wheel reported no wheel in {out_dir}:\n{_tail(proc.stdout)}")
    return out_dir / names[-1]


def _fetch(spec: str, target: Target, out_dir: Path, build_pure: bool) -> tuple[Path | None, str, str]:
    """Download, and turn a pure-Python sdist into its wheel when asked: (path, why not, sdist built)."""
    path, why = _download(spec, target, out_dir)
    if path is None or path.name.endswith(".whl") or not build_pure:
        return path, why, ""
    wheel = _pure_wheel(path, out_dir)
    if wheel is None:
        return path, why, ""
    path.unlink()
    return wheel, why, path.name


def _pure_wheel(sdist: Path, out_dir: Path) -> Path | None:
    """``pip wheel`` the sdist (isolated, like Kaggle's pip would); the wheel if it is ``py*-none-any``."""
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
        proc = subprocess.run(_pip("wheel", "--no-deps", "-w", tmp, str(sdist)), capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1 or not wheels[0].name.endswith("-none-any.whl"):
            return None  # a compiled wheel built here would be tied to this machine's glibc: keep the sdist
        final = out_dir / wheels[0].name
        os.replace(wheels[0], final)
        return final


def _download(spec: str, target: Target, out_dir: Path) -> tuple[Path | None, str]:
    """One ``pip download --no-deps`` for the target: a wheel, else the sdist. (path, "") or (None, why)."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out_dir) as tmp:
        base = _pip("download", "--no-deps", "--progress-bar", "off", "--dest", tmp, *target.pip_args())
        proc = subprocess.run([*base, "--only-binary=:all:", spec], capture_output=True, text=True)
        if proc.returncode != 0:
            # pip accepts --platform & co without --only-binary when --no-deps is given: the sdist is
            # fetched and its metadata prepared (which may need its build backend from the index)
            proc = subprocess.run([*base, spec], capture_output=True, text=True)
        got = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(got) != 1:
            return None, _tail(proc.stderr + proc.stdout, 8)
        final = out_dir / got[0].name
        os.replace(got[0], final)  # same filesystem: the folder only ever holds complete files
        return final, ""


# ---------------------------------------------------------------- the resolver

@dataclasses.dataclass
class _Node:
    file: WheelFile
    meta: DistMetadata
    extras_done: set[str] = dataclasses.field(default_factory=set)  # "" = the base dependencies


Pending = list[tuple[Requirement, str]]  # (requirement, who required it)


class _Resolver:
    """Breadth-first: each round downloads the new names of the previous round's dependencies."""

    def __init__(self, out_dir: Path, target: Target, exclude: Iterable[str], build_pure: bool, jobs: int,
                 log: Callable[[str], None]) -> None:
        self.report = WheelhouseReport(out_dir=out_dir, target=target)
        self.exclude = frozenset(_pattern(e) for e in exclude)
        self.nodes: dict[str, _Node] = {}
        self.failed: set[str] = set()
        self.build_pure, self.jobs, self.log = build_pure, jobs, log

    def run(self, requirements: Sequence[Requirement], extra_wheels: Sequence[Path]) -> WheelhouseReport:
        pending: Pending = []
        for wheel in extra_wheels:
            pending += self.add_local(wheel)
        pending += self.wanted(requirements, REQUESTED, {""})
        while pending:
            groups = self.triage(pending)
            self.fetch([name for name in groups if name not in self.nodes], groups)
            pending = [dep for name, pairs in groups.items() for dep in self.settle(name, pairs)]
        return self.report

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def triage(self, pending: Pending) -> dict[str, Pending]:
        """Group by name, dropping excluded and failed names; refuses torch."""
        groups: dict[str, Pending] = {}
        for req, requirer in pending:
            name = canonicalize_name(req.name)
            if name in self.failed:
                continue
            if name not in self.nodes and self.excluded(name):
                who = f"{requirer} ({req.specifier})" if req.specifier else requirer
                _append_once(self.report.excluded.setdefault(name, []), who)
                needs = self.report.image_needs.setdefault(name, [])
                if [requirer, str(req.specifier)] not in needs:
                    needs.append([requirer, str(req.specifier)])
                continue
            if name in REFUSED:
                raise ValueError(f"{requirer} requires {req}: refusing to put {name} in the wheelhouse. Kaggle "
                                 f"ships a CUDA build of it that must not be replaced; keep {name!r} in exclude.")
            groups.setdefault(name, []).append((req, requirer))
        return groups

    def fetch(self, names: list[str], groups: dict[str, Pending]) -> None:
        """Download the first requirement of each new name, in parallel; record files and failures."""
        if names:
            self.log(f"downloading {len(names)}: {', '.join(names)}")
        specs = [_plain(groups[name][0][0], keep_extras=False) for name in names]
        target, out_dir = self.report.target, self.report.out_dir
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            results = list(pool.map(lambda s: _fetch(s, target, out_dir, self.build_pure), specs))
        for name, spec, (path, why, built_from) in zip(names, specs, results):
            requirers = ", ".join(dict.fromkeys(who for _, who in groups[name]))
            if path is None:
                self.failed.add(name)
                self.report.problems.append(f"{spec} (required by {requirers}): no file for the target — {why}")
            else:
                self.record(name, path, spec, requirers).file.built_from = built_from

    def record(self, name: str, path: Path, spec: str, requirers: str) -> _Node:
        meta = read_metadata(path)
        kind = "wheel" if path.name.endswith(".whl") else "sdist"
        node = _Node(WheelFile(meta.name, meta.version, path.name, kind, [], path.stat().st_size), meta)
        self.nodes[name] = self.nodes[meta.name] = node  # the same unless the index renamed it
        self.report.files.append(node.file)
        self.log(f"  {path.name} ({node.file.size_bytes / 2**20:.1f} MiB) ← {requirers}")
        if kind == "sdist":
            self.report.sdists.append(_sdist_message(meta.name, spec, path.name, meta.requires is None))
        return node

    def add_local(self, wheel: Path) -> Pending:
        """Copy a given wheel in and treat it as resolved; returns its base dependencies."""
        if not (wheel.is_file() and wheel.name.endswith(".whl")):
            raise ValueError(f"extra_wheels: {wheel} is not a wheel file")
        meta = read_metadata(wheel)
        if meta.name in REFUSED:
            raise ValueError(f"{wheel.name}: refusing to put {meta.name} in the wheelhouse (Kaggle's CUDA build "
                             "must not be replaced)")
        if not self.report.target.fits(wheel.name):
            self.report.problems.append(f"{wheel.name}: its tags do not install on the target "
                                        f"({self.report.target.abi} {self.report.target.platforms[0]})")
        dest = self.report.out_dir / wheel.name
        if wheel.resolve() != dest.resolve():
            shutil.copy2(wheel, dest)
        node = self.record(meta.name, dest, f"{meta.name}=={meta.version}", EXTRA_WHEEL)
        node.file.required_by.append(EXTRA_WHEEL)
        return self.settle(meta.name, [])

    def settle(self, name: str, pairs: Pending) -> Pending:
        """Check every requirement of ``name`` against the chosen version; returns dependencies not yet
        followed (the base ones the first time, then those of newly requested extras)."""
        node = self.nodes.get(name)
        if node is None:
            return []
        wanted = {""}
        for req, requirer in pairs:
            _append_once(node.file.required_by, requirer)
            if not req.specifier.contains(Version(node.file.version), prereleases=True):
                self.report.conflicts.append(f"{name}: {requirer} requires {req.specifier} but {node.file.version} "
                                             f"was chosen (for {node.file.required_by[0]})")
            wanted |= {canonicalize_name(e) for e in req.extras}
        new = wanted - node.extras_done
        if not new or node.meta.requires is None:
            return []
        node.extras_done |= new
        return self.wanted(node.meta.requires, name, new)

    def wanted(self, requires: Iterable[Requirement], requirer: str, extras: set[str]) -> Pending:
        """Requirements whose marker holds for the target under any of ``extras`` ("" = the base). The
        others are recorded as skipped by marker, except those of extras nobody asked for."""
        env = self.report.target.marker_environment()
        out: Pending = []
        for req in requires:
            if _holds(req, env, extras):
                out.append((req, requirer))
            elif not _named_extras(req) or _named_extras(req) & extras:
                _append_once(self.report.skipped_by_marker.setdefault(str(req), []), requirer)
        return out


def _named_extras(req: Requirement) -> set[str]:
    """The extras a marker names (packaging writes them as ``extra == "name"``)."""
    found = re.findall(r'\bextra == "([^"]*)"|"([^"]*)" == extra\b', str(req.marker))
    return {canonicalize_name(a or b) for a, b in found}


def _append_once(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _plain(req: Requirement, keep_extras: bool = True) -> str:
    """The requirement without its marker (already evaluated for the target); ``pip download --no-deps``
    takes it without extras too."""
    plain = Requirement(str(req))
    plain.marker = None
    if not keep_extras:
        plain.extras = set()
    return str(plain)


def _sdist_message(name: str, spec: str, filename: str, deps_unknown: bool) -> str:
    unknown = (" Its dependencies are unknown (its PKG-INFO does not list them): none were followed."
               if deps_unknown else "")
    return (f"{filename}: no wheel for the target — Kaggle would have to compile it offline, which needs its "
            f"build dependencies (and a compiler) in the wheelhouse.{unknown} Avoid it: in a Kaggle session "
            f"with internet on run `pip wheel --no-deps '{spec}' -w wheels/`, download wheels/ and pass that "
            f"wheel via extra_wheels; {name} is then taken from it.")


def build_wheelhouse(out_dir: str | Path, requirements: Iterable[str | Requirement], target: Target,
                     exclude: Iterable[str] = KAGGLE_SHIPS, extra_wheels: Iterable[str | Path] = (),
                     build_pure_sdists: bool = True, log: Callable[[str], None] = print,
                     jobs: int = 4) -> WheelhouseReport:
    """Download into ``out_dir`` every distribution ``requirements`` need on ``target``, except ``exclude``.

    Args:
        out_dir: the wheelhouse folder (created; files already there are kept and listed as other files).
        requirements: PEP 508 strings or ``Requirement``; markers are evaluated for ``target``.
        target: interpreter and platform of the machine that will install (``Target.kaggle()``).
        exclude: canonical names (``nvidia-*`` prefixes too) the target already has; never downloaded,
            never recursed into, recorded in ``report.excluded`` with their requirers.
        extra_wheels: wheels copied in first and treated as resolved (e.g. gptqmodel built on Kaggle).
        build_pure_sdists: build each sdist here with ``pip wheel`` (isolated, as Kaggle's pip would) and
            keep the wheel instead when it is pure Python (``*-none-any``); compiled ones stay sdists.
        log: progress lines; jobs: parallel ``pip download`` processes per round.
    Returns:
        ``WheelhouseReport`` (``report.ok`` False on conflicts or problems).
    Raises:
        ValueError: a torch requirement (or wheel) that is not excluded.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in out_dir.iterdir()}
    reqs = [r if isinstance(r, Requirement) else Requirement(r) for r in requirements]
    log(f"wheelhouse {out_dir}: {len(reqs)} requirements for {target.abi} {target.platforms[0]}")
    resolver = _Resolver(out_dir, target, exclude, build_pure_sdists, jobs, log)
    report = resolver.run(reqs, [Path(w) for w in extra_wheels])
    ours = {f.filename for f in report.files}
    report.other_files = sorted(n for n in before - ours if n.endswith((".whl", ".tar.gz", ".zip")))
    return report


# ---------------------------------------------------------------- lmsys_lib's own requirements

def lmsys_requirements(wheel_path: str | Path, extras: Iterable[str] = ("quantize",),
                       target: Target | None = None) -> list[str]:
    """The Requires-Dist of a built wheel for its base plus ``extras``, markers evaluated for ``target``
    (default ``Target.kaggle()``) and dropped, so the strings are ready for ``build_wheelhouse``.
    Raises ``ValueError`` for an extra the wheel does not provide."""
    meta = read_metadata(wheel_path)
    wanted = {canonicalize_name(e) for e in extras}
    unknown = wanted - meta.provides_extras
    if unknown:
        raise ValueError(f"{meta.name} provides no extra {sorted(unknown)}; it has {sorted(meta.provides_extras)}")
    env = (target or Target.kaggle()).marker_environment()
    requires = meta.requires or ()
    while True:  # a self-reference (dev = lmsys_lib[train,...]) can name further extras
        own = {canonicalize_name(e) for r in requires
               if canonicalize_name(r.name) == meta.name and _holds(r, env, {""} | wanted) for e in r.extras}
        if own <= wanted:
            break
        wanted |= own
    picked = [_plain(r) for r in requires
              if canonicalize_name(r.name) != meta.name and _holds(r, env, {""} | wanted)]
    return list(dict.fromkeys(picked))


def _holds(req: Requirement, env: dict[str, str], extras: Iterable[str]) -> bool:
    """Whether the marker holds in ``env`` with ``extra`` set to any of ``extras`` ("" = none asked)."""
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras)


# ---------------------------------------------------------------- proving the offline install

@dataclasses.dataclass(frozen=True)
class InstallCheck:
    """A successful offline install: the venv's python, pip's output and where each import came from."""

    venv_dir: Path
    python: Path
    pip_output: str
    module_files: dict[str, str]


def offline_pip_env() -> dict[str, str]:
    """The environment for a pip that sees nothing but ``--find-links``: no config file (``/dev/null`` makes
    pip skip every config file), no index, no PIP_* settings inherited, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


_IMPORT_PROBE = """
import importlib, json, sys
print(json.dumps({m: getattr(importlib.import_module(m), "__file__", None) for m in sys.argv[1:]}))
"""


LIGHT_IMPORTS = ("lmsys_lib", "lmsys_lib.parsing", "lmsys_lib.prompting", "lmsys_lib.config", "lmsys_lib.kaggle",
                 "lmsys_lib.wheelhouse", "lmsys_lib.cli")


def install_check(wheelhouse: str | Path, venv_dir: str | Path, package: str = "lmsys_lib",
                  imports: Sequence[str] = LIGHT_IMPORTS, requirements: str | None = None) -> InstallCheck:
    """Install ``package`` into a fresh venv from ``wheelhouse`` alone, then import ``imports`` there from a
    temporary folder; every module must come from the venv. ``requirements``: a file in the wheelhouse
    (``requirements_file(extra)``) — the notebooks' install, exactly: ``package`` with ``--no-deps``, then
    ``-r`` that file; ``pip check`` then tolerates ``package``'s own pins that the file re-pinned.

    Raises ``PipError`` (tail of the output) when venv creation, the install, ``pip check`` or an import
    fails, and ``ValueError`` when ``venv_dir`` exists and is not empty.
    """
    venv_dir, wheelhouse = Path(venv_dir).resolve(), Path(wheelhouse).resolve()
    if venv_dir.exists() and any(venv_dir.iterdir()):
        raise ValueError(f"{venv_dir} is not empty: install_check needs a fresh venv folder")
    _run([sys.executable, "-m", "venv", str(venv_dir)], "python -m venv")
    python, env = venv_dir / "bin" / "python", offline_pip_env()
    pip = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse)]
    if requirements is None:
        install = _run([*pip, package], "offline pip install", env=env)
    else:  # what every notebook's install cell runs, with nothing but the wheelhouse to draw on
        install = _run([*pip, "--no-deps", package], "offline pip install --no-deps", env=env)
        install.stdout += _run([*pip, "-r", str(wheelhouse / requirements)], "offline pip install -r",
                               env=env).stdout
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=env)
    own = canonicalize_name(package)
    broken = [line for line in check.stdout.splitlines() if line.strip() and not (
        requirements and canonicalize_name(line.split()[0]) == own)]  # "lmsys-lib 0.1.0 requires gptqmodel==…"
    if check.returncode and broken:
        raise PipError(f"pip check failed: {_tail(chr(10).join(broken))}")
    with tempfile.TemporaryDirectory(prefix="lmsys-import-") as cwd:
        # -I: ignore PYTHON* variables and keep cwd off sys.path, so the checkout cannot shadow the venv
        probe = _run([str(python), "-I", "-c", _IMPORT_PROBE, *imports], "import check", env=env, cwd=cwd)
    files = json.loads(probe.stdout.strip().splitlines()[-1])
    outside = {m: f for m, f in files.items() if f is None or not Path(f).resolve().is_relative_to(venv_dir)}
    if outside:
        raise PipError(f"imported from outside {venv_dir}: {outside}")
    return InstallCheck(venv_dir, python, install.stdout + check.stdout, files)
