"""hub_upload push against a loopback Hub on 127.0.0.1: one commit holding every file, download and
remote-code loading through HF_ENDPOINT, clear failures, and a token that never shows."""

import subprocess
import sys

import PIL.Image
import pytest
import torch
from hub_fixtures import REPO_ROOT, clean_env, reference_outputs, run_probe, write_tiny_run
from hub_server import DEFAULT_USER, LoopbackHub

from hub_upload.export import export_run
from hub_upload.push import PushError, folder_files, push_folder, validate_repo_id

TOKEN = "hf_loopbackSECRETtoken0123456789"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    run, model, processor = write_tiny_run(root / "run")
    return export_run(run, root / "export", max_shard_size="150KB"), model, processor


def push_cli(*args, endpoint, token=TOKEN, home):
    env = clean_env(home, HF_ENDPOINT=endpoint, HF_HUB_VERBOSITY="debug")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "training.cli", "push", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_push_one_commit_then_load_from_the_hub(exported, tmp_path):
    folder, model, processor = exported
    with LoopbackHub(TOKEN) as hub:
        done = push_cli(folder, "--repo-id", "unicode-tiny", "--private", endpoint=hub.url, home=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert TOKEN not in done.stdout + done.stderr
        repo_id = f"{DEFAULT_USER}/unicode-tiny"  # NAME alone lands in the token owner's namespace
        assert f"to {repo_id}@main in one commit" in done.stdout

        # ONE commit, holding every file of the export byte for byte, sent with the token.
        assert len(hub.commits) == 1
        commit = hub.commits[0]
        assert commit["repo_id"] == repo_id and commit["revision"] == "main"
        assert sorted(commit["files"]) == folder_files(folder)
        for name, data in commit["files"].items():
            assert data == (folder / name).read_bytes(), name
        assert {
            "model.safetensors.index.json",
            "vision_tokenizer/config.json",
            "README.md",
            "modeling_unicode.py",
        } <= set(commit["files"])
        writes = [(method, path) for method, path, authorized in hub.requests if method == "POST"]
        assert ("POST", "/api/repos/create") in writes and ("POST", f"/api/models/{repo_id}/commit/main") in writes
        assert all(authorized for method, _, authorized in hub.requests if method == "POST")
        assert hub.repos[repo_id]["private"] is True

        # A clean interpreter downloads it from HF_ENDPOINT and loads it through remote code.
        image = PIL.Image.fromarray(
            (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(5)) * 255).byte().numpy()
        )
        image.save(tmp_path / "image.png")
        loaded = run_probe(
            repo_id, tmp_path / "image.png", tmp_path / "clean", clean_env(tmp_path / "dl", HF_ENDPOINT=hub.url)
        )
        assert {
            "config.json",
            "model.safetensors.index.json",
            "modeling_unicode.py",
            "processor_config.json",
            "vision_tokenizer/config.json",
        } <= set(hub.downloads)
        expected = reference_outputs(model, processor, PIL.Image.open(tmp_path / "image.png"))
        assert loaded["blocked_loaded"] == [] and loaded["model_module"].startswith("transformers_modules.")
        assert loaded["text_ids"] == expected["text_ids"] and loaded["image_ids"] == expected["image_ids"]
        assert loaded["vision_codes"] == expected["vision_codes"]

        # A second push to a branch: created, one more commit, on that branch.
        result = push_folder(folder, repo_id, revision="v1", token=TOKEN, endpoint=hub.url)
        assert len(hub.commits) == 2 and hub.commits[1]["revision"] == "v1" and result.commit_oid
        assert ("POST", f"/api/models/{repo_id}/branch/v1", True) in hub.requests


def test_push_failures_are_clear_and_never_show_the_token(exported, tmp_path):
    folder, _, _ = exported
    with LoopbackHub(TOKEN, fail="commit") as hub:
        done = push_cli(folder, "--repo-id", "me/unicode-tiny", endpoint=hub.url, home=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "could not commit the files" in done.stderr and "HTTP 500" in done.stderr and hub.url in done.stderr
        assert TOKEN not in done.stdout + done.stderr and hub.commits == []

    with LoopbackHub(TOKEN) as hub:
        done = push_cli(
            folder, "--repo-id", "me/unicode-tiny", endpoint=hub.url, token="hf_wrongWRONGwrong", home=tmp_path
        )
        assert done.returncode == 2 and "HTTP 401" in done.stderr and "token is invalid" in done.stderr
        assert "hf_wrongWRONGwrong" not in done.stdout + done.stderr

        # Invalid repo ids and dry runs never reach the server.
        for bad in ("a/b/c", "-bad", "me/has space", "me/x--y", ""):
            done = push_cli(folder, f"--repo-id={bad}", endpoint=hub.url, home=tmp_path)
            assert done.returncode == 2 and "not a valid Hub repository id" in done.stderr, bad
        before = len(hub.requests)
        done = push_cli(folder, "--repo-id", "me/unicode-tiny", "--dry-run", endpoint=hub.url, home=tmp_path)
        assert done.returncode == 0 and "would push" in done.stdout and "modeling_unicode.py" in done.stdout
        assert len(hub.requests) == before and hub.commits == []

    with pytest.raises(ValueError, match="not an exported model folder"):
        push_folder(tmp_path, "me/x", dry_run=True)
    with pytest.raises(TypeError, match="repo_id must be a string"):
        validate_repo_id(None)
    with pytest.raises(PushError, match="could not reach the Hub"):
        push_folder(folder, "me/x", token=TOKEN, endpoint="http://127.0.0.1:9")
