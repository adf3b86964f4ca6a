"""Stage II on a run folder through the CLI: decompress -> sft -> <run>/mllm; kill and resume from
the last COMPLETE checkpoint; a 2-rank CPU DDP run with the accelerate config; every accelerate
config parses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stage2_fixtures import make_tiny_run
from utils_network import free_port

from training.cli import main

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--train-images", "16", "--eval-images", "4", "--cpu"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def fresh_run(stage1_run, folder):
    shutil.copytree(stage1_run, folder, ignore=shutil.ignore_patterns("stage2", "codes", "mllm"))
    return folder


def env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def test_cli_decompress_then_sft_gives_a_loadable_mllm(stage1_run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = fresh_run(stage1_run, tmp_path / "run")
    # --lora: this is the adapter + merge path (the tiny recipe itself fine-tunes fully)
    assert (
        main(
            [
                "train",
                "--stage",
                "decompress",
                "--output",
                str(run),
                "--steps",
                "4",
                "--save-steps",
                "2",
                "--lora",
                *SMALL,
            ]
        )
        == 0
    )
    assert (
        main(["train", "--stage", "sft", "--output", str(run), "--steps", "4", "--save-steps", "2", "--lora", *SMALL])
        == 0
    )
    sft = json.loads((run / "stage2" / "sft" / "metrics.json").read_text())
    assert sft["base"] == str(run / "stage2" / "decompress" / "model")  # sft continues the decompressed model
    assert (run / "mllm" / "COMPLETE").is_file() and (
        run / "stage2" / "sft" / "adapter" / "adapter_config.json"
    ).is_file()
    assert any(p.name.startswith("train-16") for p in (run / "codes").iterdir())
    model = AutoModelForImageTextToText.from_pretrained(run / "mllm")
    processor = AutoProcessor.from_pretrained(run / "mllm")
    assert type(processor).__name__ == "UniCodeProcessor" and model.config.vq_config.codebook_token_ids
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "stage2" / "sft" / "adapter"), "--output", str(out)]) == 0
    assert (out / "COMPLETE").is_file()


def test_sft_with_grounded_attention_trains_its_head_and_saves_a_plain_model(stage1_run, tmp_path):
    """`grounded_attention` on a Shapes run: the term is logged at every step and the saved model is the usual one
    (nothing of the grounding stays in it); with LoRA it is refused before training, naming the fix."""
    from transformers import AutoModelForImageTextToText

    from training.stage2 import StageIIArguments, stage_paths, train_stage2

    run = fresh_run(stage1_run, tmp_path / "run")
    common = dict(
        run_dir=str(run),
        stage="sft",
        max_steps=3,
        batch_size=4,
        train_images=16,
        eval_images=4,
        use_cpu=True,
        save_steps=3,
        logging_steps=1,
        questions_per_image=4,
        questions_per_conversation=4,
        grounded_attention=0.05,
    )
    with pytest.raises(ValueError, match="use lora: false"):
        train_stage2(StageIIArguments(**common, lora=True))
    train_stage2(StageIIArguments(**common, lora=False, grounding_heads="any"))
    state = json.loads((stage_paths(run, "sft")["trainer"] / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [entry["grounding_loss"] for entry in state["log_history"] if "grounding_loss" in entry]
    assert len(logged) == 3 and all(value > 0 for value in logged)
    model = AutoModelForImageTextToText.from_pretrained(run / "mllm")
    assert not any("grounding" in name for name, _ in model.named_parameters())


def _last_step(trainer_dir: Path) -> int:
    from training.sft import last_complete_checkpoint

    last = last_complete_checkpoint(trainer_dir) if trainer_dir.is_dir() else None
    return int(last.name.split("-")[1]) if last is not None else -1


def test_killed_sft_resumes_from_the_last_complete_checkpoint(stage1_run, tmp_path):
    run = fresh_run(stage1_run, tmp_path / "run")
    trainer_dir = run / "stage2" / "sft" / "trainer"
    command = [
        sys.executable,
        "-m",
        "training.cli",
        "train",
        "--stage",
        "sft",
        "--output",
        str(run),
        "--steps",
        "100000",
        "--save-steps",
        "3",
        *SMALL,
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and _last_step(trainer_dir) < 6:
            assert process.poll() is None, "training exited before it was killed"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    from training.sft import last_complete_checkpoint

    # Older checkpoints are rotated away: the newest complete one and at most one more remain.
    assert len([p for p in trainer_dir.glob("checkpoint-*") if (p / "COMPLETE").is_file()]) <= 2
    last = last_complete_checkpoint(trainer_dir)
    assert last is not None and int(last.name.split("-")[1]) >= 6
    partial = trainer_dir / "checkpoint-999999"  # what a kill during a save leaves: no COMPLETE marker
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")
    step = int(last.name.split("-")[1])
    assert (
        main(
            [
                "train",
                "--stage",
                "sft",
                "--output",
                str(run),
                "--steps",
                str(step + 2),
                "--save-steps",
                "3",
                "--resume",
                *SMALL,
            ]
        )
        == 0
    )
    metrics = json.loads((run / "stage2" / "sft" / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(last) and metrics["global_step"] == step + 2
    assert not partial.exists()


def test_two_process_cpu_ddp_sft_with_the_accelerate_config(stage1_run, tmp_path):
    run = fresh_run(stage1_run, tmp_path / "run")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configuration/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "training.cli",
        "train",
        "--stage",
        "sft",
        "--output",
        str(run),
        "--steps",
        "3",
        "--save-steps",
        "2",
        *SMALL,
    ]
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in result.stderr
    assert "find_unused_parameters=True" not in result.stderr  # every trainable parameter is used in every step
    metrics = json.loads((run / "stage2" / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert (run / "mllm" / "COMPLETE").is_file()
    # COMPLETE alone once hid a stage-0 folder without weights (several ranks renaming into place): load it.
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(run / "mllm").config.vq_config.codebook_token_ids


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(REPO / "configuration" / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP}.get(name, DistributedType.DEEPSPEED)
    assert config.distributed_type == expected
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
