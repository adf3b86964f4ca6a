"""Push an exported folder to the Hugging Face Hub: `create_repo`, then ONE commit holding every file.

One commit (rather than `upload_folder`'s possible multi-commit or background paths) means a repo
is never seen half-uploaded: either every file of the export is there, or none of them is.

The token comes from the usual places (`token=`, `HF_TOKEN`, the saved login) and is never printed:
error messages are scrubbed of it. `HF_ENDPOINT` is read when pushing, not at import, so a process
that sets it late still reaches the endpoint it names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

# Files an export must hold to be worth pushing (export writes them).
REQUIRED_FILES = ("config.json", "README.md")
SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}
_REPO_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class PushError(RuntimeError):
    """The Hub (or the server at HF_ENDPOINT) refused or failed the push."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: list[str] = field(default_factory=list)
    commit_url: Optional[str] = None
    commit_oid: Optional[str] = None
    dry_run: bool = False
    endpoint: Optional[str] = None

    def summary(self) -> str:
        target = f"{self.repo_id}@{self.revision}"
        if self.dry_run:
            listing = "\n".join(f"  {name}" for name in self.files)
            return f"dry run: would push {len(self.files)} files to {target} in one commit:\n{listing}"
        return f"pushed {len(self.files)} files to {target} in one commit {self.commit_oid}: {self.commit_url}"


def validate_repo_id(repo_id) -> str:
    """`NAME` or `OWNER/NAME` (letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96 characters)."""
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string such as 'your-name/unicode-tiny', got {type(repo_id).__name__}")
    parts = repo_id.split("/")
    if (
        not 1 <= len(parts) <= 2
        or not all(_REPO_NAME.match(part) for part in parts)
        or repo_id.endswith((".git", "."))
    ):
        raise ValueError(
            f"repo_id {repo_id!r} is not a valid Hub repository id; use NAME or OWNER/NAME made of letters, digits, "
            "'-', '_' and '.', such as 'your-name/unicode-tiny'"
        )
    return repo_id


def folder_files(folder: Union[str, os.PathLike]) -> list[str]:
    """The repository paths (posix, sorted) of every file an export folder holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} is not a directory; pass the OUT_DIR of `unicode-mllm export`")
    # A model export has config.json; an adapter-only export has adapter_config.json instead.
    missing = (
        [] if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file() else ["config.json"]
    )
    missing += [name for name in REQUIRED_FILES if name != "config.json" and not (folder / name).is_file()]
    missing += [] if any(folder.glob("*.safetensors")) else ["*.safetensors"]
    if missing:
        raise ValueError(
            f"{str(folder)!r} is not an exported model folder (missing {', '.join(missing)}); "
            "run `unicode-mllm export RUN_DIR OUT_DIR` first"
        )
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not SKIPPED_DIRS.intersection(relative.parts[:-1]):
            if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                raise ValueError(
                    f"{relative} is a pickled file; the Hub repo holds safetensors weights only — re-export"
                )
            files.append(relative.as_posix())
    return files


def _scrub(text: str, token: Optional[str]) -> str:
    return text.replace(token, "***") if token else text


def push_folder(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    dry_run: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> PushResult:
    """Upload the export `folder` to the model repo `repo_id` in a single commit.

    Args:
        private: create the repo private (ignored if it exists).
        revision: branch to commit to (default `main`); created from `main` if missing.
        dry_run: only list the files; no server is contacted and no token is needed.
        token: default: `HF_TOKEN` or the saved login.
        endpoint: default: `HF_ENDPOINT`, else huggingface.co.

    Raises:
        ValueError / TypeError: bad `repo_id`, or `folder` is not an export.
        PushError: no token, or the server refused or failed (its status and message, never the token).
    """
    repo_id = validate_repo_id(repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or ".." in revision):
        raise ValueError(f"revision {revision!r} is not a valid branch name; pass a name such as 'main' or 'v1'")
    files = folder_files(folder)
    revision = revision or "main"
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    result = PushResult(repo_id=repo_id, revision=revision, files=files, dry_run=dry_run, endpoint=endpoint)
    if dry_run:
        return result

    try:  # huggingface_hub >= 2 speaks through httpx2, 1.x through httpx
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError

    token = token or get_token()
    if not token:
        raise PushError("no Hub token found; log in with `hf auth login` or set HF_TOKEN (a write token)")
    api = HfApi(endpoint=endpoint, token=token)
    folder = Path(folder)
    step = "create the repository"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = result.repo_id = repo_url.repo_id  # NAME alone resolves to the token owner's namespace
        if revision != "main":
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "commit the files"
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload UniCode model ({len(files)} files)",
            revision=revision,
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = {
            401: "the token is invalid or expired",
            403: "the token cannot write to this repository",
            404: "the repository or revision does not exist",
        }.get(status, "the server failed")
        detail = _scrub(str(error).strip().splitlines()[0] if str(error).strip() else "", token)
        raise PushError(f"could not {step} at {endpoint} (HTTP {status}: {hint}): {detail}") from None
    except (OSError, TransportError) as error:  # connection refused, DNS, TLS, timeouts
        raise PushError(f"could not reach the Hub at {endpoint} to {step}: {_scrub(str(error), token)}") from None
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    return result


__all__ = ["push_folder", "validate_repo_id", "folder_files", "PushResult", "PushError"]
