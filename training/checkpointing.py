"""Atomic folder writes: nothing a crash leaves behind can be mistaken for a finished result.

Every stage writes its output (an HF folder, a training checkpoint) into `<name>.tmp-<pid>` beside
the destination and renames it into place only when complete; a `COMPLETE` marker inside lets
readers tell a finished folder from one copied by hand or left by an older version. Small files
(records beside such folders) go through a temporary file and one rename for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

COMPLETE_MARKER = "COMPLETE"


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `destination` in one rename."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        (temporary / COMPLETE_MARKER).write_text("ok\n")
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
