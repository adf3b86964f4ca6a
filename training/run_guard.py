"""Output folders that are never written twice at once, never replaced by accident, and never resumed with other
settings than they were started with.

Checkpoints are atomic (`checkpointing.atomic_directory`), but that alone does not stop two commands from writing
one folder at the same time (one result silently lost, logs interleaved), a re-run from replacing hours of
training, or `--resume` from continuing a checkpoint with another learning rate and recording it as the run's.
Every command of the CLI that writes a folder therefore runs inside `guard_output`:

- a lock file beside the folder (`.NAME.unicode-lock`: pid, host, command) admits one writer; a second is refused
  with the holder's name, and a lock whose process is gone is taken over with a warning;
- the folders the command produces (`products`) must not exist unless `--resume` (continue them) or `--overwrite`
  (delete exactly those, nothing else) is given;
- temporary folders a crashed writer left (`*.tmp-PID`, `*.old-PID`, an export's `.NAME.partial-*`) are removed,
  since the lock proves nobody is still writing them.

`check_resume_settings` is the one comparison of a checkpoint's recorded settings with a resuming run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from .checkpointing import is_complete

LOCK_SUFFIX = ".unicode-lock"
RUN_SETTINGS_FILE = "run_settings.json"  # beside a trainer's checkpoints: the arguments the run started with
# What atomic writes leave behind when their process dies: `<name>.tmp-<pid>`, `<name>.old-<pid>`
# (checkpointing.atomic_directory) and an export's `.<name>.partial-<random>` (hub_upload.export).
_LEFTOVER = re.compile(r".+\.(tmp|old)-\d+$")


class OutputFolderError(ValueError):
    """An output folder that cannot be written as asked: held by another run, holding finished work, or not a
    folder. The CLI prints it as one error line."""


class ResumeSettingsError(ValueError):
    """`--resume` asked to continue a checkpoint with settings other than the ones it was trained with."""


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_lock(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a writer that died mid-write: treated as stale


def _holder(record: dict) -> str:
    return (
        f"pid {record.get('pid', '?')} on {record.get('host', '?')} (`{record.get('command', '?')}`, started "
        f"{record.get('started', '?')})"
    )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the lock of `folder` for the body; refuse with `OutputFolderError` if a live process holds it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    text = json.dumps(record)
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            if held is None:  # released between the two calls
                continue
            same_host = held.get("host") == record["host"]
            if held and (not same_host or _process_alive(int(held.get("pid", -1)))):
                where = "" if same_host else " (another host: it cannot be checked from here)"
                raise OutputFolderError(
                    f"{Path(folder)} is being written by {_holder(held)}{where}. Wait for it to finish or choose "
                    f"another output folder; if that run is gone, delete {path}"
                ) from None
            warnings.warn(f"taking over the lock of {Path(folder)} from {_holder(held or {})}, which has ended")
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            try:
                os.replace(path, stale)  # one taker wins the rename; a loser retries and meets the winner's lock
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as lock:
            lock.write(text)
        break
    try:
        yield path
    finally:
        if path.is_file() and _read_lock(path) == record:
            path.unlink(missing_ok=True)


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete what crashed atomic writes left in `folder` (and an export's partial folders beside it). Only
    called under the folder's lock, so nothing found can belong to a live writer."""
    folder = Path(folder)
    found: list[Path] = []
    if folder.is_dir():
        found += [p for p in folder.rglob("*") if _LEFTOVER.fullmatch(p.name)]
    if folder.parent.is_dir():
        found += list(folder.parent.glob(f".{folder.name}.partial-*"))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def _is_main_process() -> bool:
    # Under `accelerate launch` every rank runs the command; rank 0 alone holds the lock and deletes.
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def guard_output(
    folder: str | os.PathLike,
    command: str,
    products: Sequence[str] = (),
    *,
    resume: bool = False,
    overwrite: bool = False,
    resumable: bool = True,
    whole_folder: bool = False,
    flag: str = "--output",
) -> Iterator[Path]:
    """Run a command that writes `folder`: one writer at a time, and the `products` (folders under `folder` the
    command writes; with `whole_folder`, `folder` itself) neither replaced without `overwrite` nor continued
    without `resume`. Checked before any model loads, so a refusal costs nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{flag} {folder} is a file, not a folder; choose a folder (nothing was deleted)")
    if resume and overwrite:
        raise OutputFolderError("--resume continues a run and --overwrite starts it again; pass one of them")
    if resume and not resumable:
        raise OutputFolderError(f"{command.split()[0]} cannot resume; pass --overwrite to train again")
    existing = [folder / name for name in products if (folder / name).exists()]
    foreign = [path for path in existing if not path.is_dir() or path.is_symlink()]
    if whole_folder and folder.is_dir() and any(folder.iterdir()):
        existing = [folder]
        foreign = [] if is_complete(folder) else [folder]  # only a folder an atomic write of ours finished
    if foreign:
        raise OutputFolderError(
            f"{', '.join(map(str, foreign))} is not a folder this command wrote; move it away or choose another "
            f"{flag} (--overwrite never deletes a file or a folder it did not write)"
        )
    if existing and not resume and not overwrite:
        what = ", ".join(map(str, existing))
        cont = "--resume to continue it, " if resumable else ""
        raise OutputFolderError(
            f"{what} already holds a finished or interrupted run; pass {cont}--overwrite to start again (it "
            f"deletes {what} only), or choose another {flag}"
        )
    if not _is_main_process():
        yield folder
        return
    with folder_lock(folder, command):
        removed = remove_leftovers(folder)
        if removed:
            print(f"removed what a crashed run left: {', '.join(map(str, removed))}", file=sys.stderr)
        if overwrite:
            for path in existing:
                shutil.rmtree(path)
        yield folder


# -- the settings a run resumes with ----------------------------------------------------------------------------
_UNSET = object()


def setting_differences(old: Any, new: Any, name: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs, nested keys joined by dots."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) + [k for k in old if k not in new]
        return [d for k in keys for d in setting_differences(old.get(k, _UNSET), new.get(k, _UNSET), f"{name}{k}.")]
    if old == new:
        return []
    old, new = ("(unset)" if v is _UNSET else repr(v) for v in (old, new))
    return [f"{name[:-1]}: {old} -> {new}"]


def _as_json(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))  # tuples as lists, paths as strings: as they read back


def check_resume_settings(
    recorded: Optional[dict], current: dict, where: str | os.PathLike, may_differ: Iterable[str] = ()
) -> None:
    """Refuse to resume `where` (a checkpoint) with settings other than `recorded`, the ones it was trained with.
    `may_differ` are settings that do not change what is trained (step budget, logging, checkpoint cadence).
    A checkpoint without a record (an older version) resumes as before."""
    if recorded is None:
        return
    skip = set(may_differ)
    old = {k: v for k, v in _as_json(recorded).items() if k not in skip}
    new = {k: v for k, v in _as_json(current).items() if k not in skip}
    differences = setting_differences(old, new)
    if differences:
        raise ResumeSettingsError(
            f"--resume: {where} was trained with other settings ({'; '.join(differences)}). Resume with the "
            "settings it was started with, or start again with --overwrite (or another --output); the checkpoint "
            "is kept as it is"
        )


def read_settings(path: str | os.PathLike) -> Optional[dict]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [
    "LOCK_SUFFIX",
    "OutputFolderError",
    "ResumeSettingsError",
    "RUN_SETTINGS_FILE",
    "check_resume_settings",
    "folder_lock",
    "guard_output",
    "lock_path",
    "read_settings",
    "remove_leftovers",
    "setting_differences",
]
