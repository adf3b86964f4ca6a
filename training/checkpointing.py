"""Atomic folder writes: nothing a crash leaves behind can be mistaken for a finished result.

Every stage writes its output (an HF folder, a training checkpoint) into `<name>.tmp-<pid>` beside
the destination and renames it into place only when complete; a `COMPLETE` marker inside lets
readers tell a finished folder from one copied by hand or left by an older version. Small files
(records beside such folders) go through a temporary file and one rename for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from safetensors import safe_open

COMPLETE_MARKER = "COMPLETE"
# Below this much free space a failed write is put down to a full disk: torch's zip writer reports one as
# "unexpected pos ..." rather than ENOSPC.
DISK_NEARLY_FULL_BYTES = 64 * 2**20


class DiskFullError(OSError):
    """A write failed because the disk is full; the last complete checkpoint is intact."""


def _disk_full(error: BaseException, folder: Path) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < DISK_NEARLY_FULL_BYTES


@contextlib.contextmanager
def naming_full_disk(folder: str | os.PathLike) -> Iterator[None]:
    """Writes into `folder`: a failure caused by a full disk says so, with the free space, instead of a zip
    writer's or pickler's internal message."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        folder = Path(folder)
        if not _disk_full(error, folder):
            raise
        existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        free = shutil.disk_usage(existing).free / 2**20 if existing.exists() else 0.0
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full while writing {folder} ({free:.0f} MB free; {type(error).__name__}: {error}). Free space on "
            "that disk and run the command again with --resume: the last complete checkpoint is kept",
        ) from error


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `destination` in one rename."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        with naming_full_disk(destination):
            yield temporary
        write_complete_marker(temporary)
        if destination.exists():
            # Two renames keep a complete copy on disk at every instant.
            previous = destination.with_name(f"{destination.name}.old-{os.getpid()}")
            os.replace(destination, previous)
            os.replace(temporary, destination)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _replace_in_one_rename(path: str | os.PathLike, write) -> Path:
    """`write(temporary)` beside `path`, then one rename over it: a reader sees the old file or the new, never a
    part; a failed write leaves the old file and no temporary."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _replace_in_one_rename(path, lambda temporary: temporary.write_text(text))


def _json_value(value):
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a value of type {type(value).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    """`data` as indented JSON, written like `atomic_write_text`; NumPy / torch scalars and paths are converted.
    Every report and metrics file goes through here."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_value))


def atomic_save_image(image, path: str | os.PathLike) -> Path:
    """A PIL image as PNG, written like `atomic_write_text` (export checks samples.png)."""
    return _replace_in_one_rename(path, lambda temporary: image.save(temporary, format="PNG"))


def unreadable_file(folder: str | os.PathLike) -> Optional[tuple[Path, str]]:
    """The first JSON or safetensors file in `folder` that does not parse (truncated, overwritten), with why."""
    for path in sorted(Path(folder).iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
        except Exception as error:  # noqa: BLE001 - any failure to parse is the answer
            return path, f"{type(error).__name__}: {error}"
    return None


@contextlib.contextmanager
def naming_corrupt_files(folder: str | os.PathLike) -> Iterator[None]:
    """Loading a model folder: a truncated weight, config or tokenizer file fails deep inside safetensors or json
    without a path; name the file instead. Failures with every file intact propagate unchanged."""
    try:
        yield
    except Exception as error:
        culprit = unreadable_file(folder) if Path(folder).is_dir() else None
        if culprit is None:
            raise
        raise ValueError(
            f"{culprit[0]} cannot be read ({culprit[1]}); the file is truncated or corrupt: copy, export or train "
            "it again"
        ) from error


# Weight files whose bytes the COMPLETE marker records: a flipped byte inside a tensor loads without any error, so
# only a checksum can tell. Configs and tokenizer files are checked by parsing them (`naming_corrupt_files`).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_complete_marker(folder: str | os.PathLike) -> None:
    """Mark `folder` finished, recording the SHA-256 of its weight files for `verify_weights`."""
    folder = Path(folder)
    weights = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    record = {"sha256": {str(p.relative_to(folder)): _sha256(p) for p in weights}}
    (folder / COMPLETE_MARKER).write_text(json.dumps(record, indent=1) + "\n")


def verify_weights(folder: str | os.PathLike) -> None:
    """Refuse weight files that changed since their folder was marked COMPLETE (a disk or copy error, an edit).
    Folders without a marker, or with the plain marker of an older version, are not checked."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        recorded = json.loads(marker.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for name, digest in recorded.items():
        path = Path(folder) / name
        if path.is_file() and _sha256(path) != digest:
            raise ValueError(
                f"{path} is not the file that was saved (its SHA-256 differs from the one in {marker}): it is "
                "corrupt. Copy, export or train it again"
            )


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def checkpoint_step(folder: Path, prefix: str) -> int:
    """N of a `<prefix>N` checkpoint folder, -1 for any other name."""
    match = re.fullmatch(re.escape(prefix) + r"(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def latest_complete_checkpoint(root: str | os.PathLike, prefix: str) -> Optional[Path]:
    """The highest-numbered `<prefix>N` folder under `root` carrying the COMPLETE marker; a folder a
    crash left half-written is never chosen (unlike transformers' `get_last_checkpoint`)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p, prefix) >= 0 and is_complete(p)]
    return max(done, key=lambda p: checkpoint_step(p, prefix)) if done else None
