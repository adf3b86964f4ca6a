"""Bad command-line input is refused at the door: a message naming the argument, exit status 2, no traceback, and
nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["train-text", "--steps", "-5"],
        ["train-tokenizer", "--steps", "0"],
        ["train-tokenizer", "--batch-size", "-1"],
        ["train", "--stage", "sft", "--steps", "0"],
        ["finetune", "--model", "m", "--dataset", "d", "--steps", "-5"],
        ["finetune", "--model", "m", "--dataset", "d", "--batch-size", "two"],
    ],
)
def test_step_and_count_flags_below_one_are_refused_before_any_work(command, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--output", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--steps" in err or "--batch-size" in err
    assert "must be" in err
    assert not out.exists()


def test_a_refused_input_from_the_shell_is_a_message_not_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "presets", "nosuch"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith("unicode-mllm presets: error: preset='nosuch'") and "Traceback" not in done.stderr
    assert "tiny" in done.stderr  # the choices
