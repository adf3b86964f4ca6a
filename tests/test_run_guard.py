"""One writer per output folder; finished work neither replaced nor resumed by accident; crash leftovers cleaned;
a resume with other settings refused by name (training.run_guard)."""

import json
import os
import socket
import subprocess
import sys

import pytest
from stage1_fixtures import make_tiny_llm

from training.checkpointing import COMPLETE_MARKER
from training.cli import main
from training.run_guard import (
    OutputFolderError,
    ResumeSettingsError,
    check_resume_settings,
    folder_lock,
    guard_output,
    lock_path,
)


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.is_dir()) for p in root.rglob("*"))


def _finished_text_lm(run):
    (run / "text_lm").mkdir(parents=True)
    (run / "text_lm" / COMPLETE_MARKER).write_text("ok\n")
    (run / "text_lm" / "model.safetensors").write_bytes(b"weights")


def _write_lock(folder, pid, host=None):
    lock_path(folder).write_text(
        json.dumps(
            {"pid": pid, "host": host or socket.gethostname(), "command": "unicode-mllm finetune", "started": "t"}
        )
    )


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run, holder.pid)
        with pytest.raises(OutputFolderError, match=f"being written by pid {holder.pid}.*unicode-mllm finetune"):
            main(["train-text", "--output", str(run), "--steps", "1"])
    finally:
        holder.kill()
        holder.wait()
    assert not run.exists()  # nothing trained, nothing written
    assert lock_path(run).is_file()  # the holder's lock is not ours to remove


def test_a_lock_on_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, 1, host="elsewhere")
    with pytest.raises(OutputFolderError, match="another host"):
        with guard_output(run, "test"):
            pass


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_after(tmp_path):
    run = tmp_path / "run"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(run, int(ended.stdout))
    with pytest.warns(UserWarning, match="taking over the lock"):
        with guard_output(run, "test") as folder:
            assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
    assert folder == run and not lock_path(run).exists()


def test_the_lock_is_released_when_the_command_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "run", "test"):
            raise RuntimeError("training failed")
    assert not lock_path(tmp_path / "run").exists()


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path):
    run = tmp_path / "run"
    _finished_text_lm(run)
    before = _snapshot(run)
    with pytest.raises(OutputFolderError, match=r"text_lm already holds .* --overwrite .* deletes .*text_lm only"):
        main(["train-text", "--output", str(run), "--steps", "1"])
    assert _snapshot(run) == before


def test_an_interrupted_tokenizer_run_names_resume_and_overwrite(tmp_path):
    run = tmp_path / "run"
    (run / "stage1" / "checkpoints").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="stage1 already holds .*--resume to continue it, --overwrite"):
        main(["train-tokenizer", "--output", str(run), "--steps", "1"])


def test_overwrite_deletes_the_commands_products_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    _finished_text_lm(run)
    (run / "notes.txt").write_text("mine")
    (run / "vision_tokenizer").mkdir()  # another stage's product
    with guard_output(run, "test", ["text_lm"], overwrite=True):
        assert not (run / "text_lm").exists()
    assert (run / "notes.txt").read_text() == "mine" and (run / "vision_tokenizer").is_dir()


def test_overwrite_never_deletes_a_plain_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "text_lm").write_text("a file of mine")
    with pytest.raises(OutputFolderError, match="not a folder this command wrote.*never deletes a file"):
        main(["train-text", "--output", str(run), "--steps", "1", "--overwrite"])
    assert (run / "text_lm").read_text() == "a file of mine"


def test_an_output_that_is_a_file_is_refused_before_training(tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(OutputFolderError, match="--output .*out is a file, not a folder"):
        main(["train-text", "--output", str(target), "--steps", "1"])
    assert target.read_text() == "keep me"


def test_merge_never_replaces_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"png")
    with pytest.raises(OutputFolderError, match="photos is not a folder this command wrote"):
        main(["merge", "--adapter", str(foreign), "--output", str(foreign), "--overwrite"])
    assert (foreign / "cat.png").read_bytes() == b"png"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(OutputFolderError, match="pass one of them"):
        main(["train-tokenizer", "--output", str(tmp_path), "--resume", "--overwrite"])


def test_leftovers_of_a_crashed_run_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    temporary = run / "stage1" / "checkpoints" / "step-0000250.tmp-4242"
    temporary.mkdir(parents=True)
    (temporary / "model.safetensors").write_bytes(b"half")
    finished = run / "stage1" / "checkpoints" / "step-0000200"
    finished.mkdir()
    partial_export = tmp_path / ".run.partial-abc123"
    partial_export.mkdir()
    with guard_output(run, "test", resume=True):
        pass
    assert not temporary.exists() and not partial_export.exists()
    assert finished.is_dir()


def test_resume_settings_name_every_difference_and_ignore_the_budget():
    recorded = {"learning_rate": 1e-3, "seed": 0, "max_steps": 60, "adam_betas": (0.9, 0.99)}
    check_resume_settings(recorded, {**recorded, "max_steps": 100}, "ckpt", may_differ=["max_steps"])
    check_resume_settings(None, {"learning_rate": 5.0}, "ckpt")  # an older checkpoint without a record
    with pytest.raises(ResumeSettingsError, match=r"ckpt was trained with other settings \(learning_rate: 0.001 -> "):
        check_resume_settings(recorded, {**recorded, "learning_rate": 2e-3, "seed": 1}, "ckpt")
    with pytest.raises(ResumeSettingsError, match="seed: 0 -> 1"):
        check_resume_settings(recorded, {**recorded, "seed": 1}, "ckpt")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.mark.parametrize("change", [{"learning_rate": 5e-3}, {"depth": 3}])
def test_stage1_resume_with_other_settings_is_refused_and_the_checkpoint_kept(tmp_path, llm_dir, change):
    from test_stage1 import make_trainer

    trainer = make_trainer(tmp_path, llm_dir, steps=4)
    trainer.train_step()
    checkpoint = trainer.save_checkpoint()
    before = _snapshot(checkpoint)
    # Another depth used to fail to load and be called a corrupt checkpoint; now the setting is named.
    name = next(iter(change))
    with pytest.raises(ResumeSettingsError, match=f"{name}: "):
        make_trainer(tmp_path, llm_dir, steps=4, **change).train(resume=True)
    assert _snapshot(checkpoint) == before
    make_trainer(tmp_path, llm_dir, steps=6).train(resume=True)  # more steps: the same run, continued
