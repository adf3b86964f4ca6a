"""transformers' own common model tests (`ModelTesterMixin`), fetched at test time, never kept in this repository.

They live in transformers' `tests/`, which the wheel does not ship; the source distribution on PyPI does. The one
matching the installed version is downloaded once (`pip download`) into a cache folder and its
`tests/test_modeling_common.py` imported from there as the package `transformers_common_tests`.

The source distribution leaves out two modules that file imports: `tests/exporters/test_export.py` and
`tests/generation/test_utils.py`. Empty stand-ins take their place, so `ModelTesterMixin` imports; the export tests
and `GenerationTesterMixin` do not come with it (tests/test_modeling_conformance.py checks generation itself).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

PACKAGE = "transformers_common_tests"
SOURCES = ("test_modeling_common.py",)
STAND_INS = {
    "exporters/test_export.py": '"""Stand-in: the source distribution does not ship tests/exporters/."""\n\n\n'
    "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": '"""Stand-in: the source distribution does not ship tests/generation/."""\n\n\n'
    "class GenerationTesterMixin:\n    pass\n",
}


class CommonTestsUnavailable(RuntimeError):
    pass


def cache_root() -> Path:
    """`UNICODE_TRANSFORMERS_TESTS_CACHE`, else the user's cache folder; one subfolder per transformers version."""
    root = os.environ.get("UNICODE_TRANSFORMERS_TESTS_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unicode-mllm"
    return Path(root) / f"transformers-{transformers.__version__}-tests"


def _download_sdist(folder: Path) -> Path:
    version = transformers.__version__
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"transformers=={version}",
        "--dest",
        str(folder),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommonTestsUnavailable(f"`pip download transformers=={version}` did not finish: {error}") from error
    archives = sorted(folder.glob(f"transformers-{version}.tar.gz"))
    if done.returncode != 0 or not archives:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise CommonTestsUnavailable(
            f"could not download the transformers=={version} source distribution from PyPI (needed for transformers' "
            f"tests/): {' | '.join(tail) or 'no archive written'}"
        )
    return archives[0]


def _extract(archive: Path, package: Path) -> None:
    prefix = f"transformers-{transformers.__version__}/tests/"
    with tarfile.open(archive) as tar:
        for name in SOURCES:
            try:
                member = tar.extractfile(prefix + name)
            except KeyError:
                member = None
            if member is None:
                raise CommonTestsUnavailable(f"{archive.name} has no tests/{name}")
            (package / name).write_bytes(member.read())
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    (package / "__init__.py").touch()


def ensure_common_tests() -> Path:
    """The folder holding the `transformers_common_tests` package, downloading and unpacking it on first use."""
    root = cache_root()
    if (root / PACKAGE / SOURCES[0]).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        scratch = Path(scratch)
        staging = scratch / "root"
        (staging / PACKAGE).mkdir(parents=True)
        _extract(_download_sdist(scratch), staging / PACKAGE)
        try:
            staging.rename(root)  # atomic: a concurrent run either sees the whole package or none
        except OSError:
            if not (root / PACKAGE / SOURCES[0]).is_file():
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
    return root


def load_modeling_common() -> ModuleType:
    """transformers' `tests/test_modeling_common.py` for the installed version; `CommonTestsUnavailable` says why
    not."""
    root = str(ensure_common_tests())
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module(f"{PACKAGE}.test_modeling_common")
    except ImportError as error:
        raise CommonTestsUnavailable(f"transformers' test_modeling_common.py does not import here: {error}") from error
