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


def test_a_missing_local_model_is_named_not_sent_to_the_hub(tmp_path, capsys):
    missing = tmp_path / "outputs" / "nosuch" / "mllm"
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--model", str(missing)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no such file or folder" in err and "Repo id" not in err


def _saved_tiny_mllm(folder):
    from utils_mllm import tiny_mllm

    model, processor = tiny_mllm()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_truncated_model_file_is_named_with_its_path(tmp_path, name):
    from training.stage2 import load_model_and_processor

    folder = tmp_path / "mllm"
    _saved_tiny_mllm(folder)
    damaged = folder / name
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{damaged}.*truncated or corrupt"):
        load_model_and_processor(folder)


def test_a_full_disk_says_disk_full_and_keeps_nothing_half_written(tmp_path, monkeypatch):
    import collections
    import shutil

    from training.checkpointing import DiskFullError, atomic_directory, naming_full_disk

    with pytest.raises(DiskFullError, match="disk full while writing .*step-1.*--resume"):
        with atomic_directory(tmp_path / "step-1") as staging:
            (staging / "part").write_bytes(b"x")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    # torch's zip writer reports a full disk as "unexpected pos": judged by the free space left.
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    with pytest.raises(DiskFullError, match=r"0 MB free; RuntimeError: .*unexpected pos 813632 vs 813524"):
        with naming_full_disk(tmp_path):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 813632 vs 813524")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**9, 10**11))
    with pytest.raises(RuntimeError, match="a bug"):  # with room on the disk, other failures pass unchanged
        with naming_full_disk(tmp_path):
            raise RuntimeError("a bug")


@pytest.fixture(scope="module")
def tiny():
    from utils_mllm import tiny_mllm

    return tiny_mllm()


def test_generate_refuses_prompts_the_model_cannot_read(tiny):
    import torch

    model, processor = tiny
    limit = model.config.get_text_config().max_position_embeddings
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor .*torch.float32"):
        model.generate(torch.ones(1, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match=f"reads at most {limit} positions.*shorten the prompt to {limit} tokens"):
        model.generate(torch.ones(1, limit + 1, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=f"max_new_tokens=10 .* use max_new_tokens <= {limit - (limit - 4)}"):
        model.generate(torch.ones(1, limit - 4, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="plus the image .* shorten the prompt"):
        model.generate(torch.ones(1, limit - 3, dtype=torch.long), generation_mode="image", guidance_scale=None)
    prompt = processor(text="a red circle", generation_mode="image")
    for scale in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="guidance_scale=.* must be a positive number, and finite"):
            model.generate(**prompt, generation_mode="image", guidance_scale=scale)


def test_encode_images_refuses_pixels_outside_minus_one_to_one(tiny):
    import torch

    model, _ = tiny
    size = model.config.vq_config.image_size
    with pytest.raises(ValueError, match=r"pixel_values span \[0, 255\] but must lie in \[-1, 1\].*/ 127.5 - 1"):
        model.model.encode_images(torch.linspace(0, 255, 3 * size * size).reshape(1, 3, size, size))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.model.encode_images(torch.full((1, 3, size, size), float("nan")))
    codes = model.model.encode_images(torch.full((1, 3, size, size), 1.01))  # within the tolerance
    assert codes.shape[0] == 1


def test_evaluate_refuses_one_generation_prompt_before_loading_a_model(capsys):
    assert main(["evaluate", "--model", "someone/unicode-tiny", "--generation-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "--generation-prompts 1 must be a whole number of at least 2" in err


def test_the_image_processor_checks_a_huge_png_before_decoding_it(tmp_path, monkeypatch):
    import PIL.Image
    import PIL.PngImagePlugin

    from modeling_unicode import UniCodeImageProcessor

    huge = tmp_path / "huge.png"
    PIL.Image.new("1", (13000, 13000)).save(huge)  # 169 M pixels in a few kB
    monkeypatch.setattr(
        PIL.PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("the pixels were decoded before the check")
    )
    with pytest.raises(ValueError, match="169000000 pixels, over max_image_pixels.*decompression-bomb guard"):
        UniCodeImageProcessor(size=32)(images=[str(huge)])


def test_a_plain_llm_or_a_config_that_does_not_fit_its_weights_is_refused(tmp_path):
    import json

    from stage1_fixtures import make_tiny_llm

    from training.sft import load_unicode_model

    llm = make_tiny_llm(tmp_path / "llm")
    with pytest.raises(ValueError, match="holds a 'llama' model, not a UniCode MLLM.*train-tokenizer --llm"):
        load_unicode_model(llm)
    folder = tmp_path / "mllm"
    _saved_tiny_mllm(folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] -= 1  # a layer of the weights would be dropped without a word
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config.json .*unexpected keys: .*layers"):
        load_unicode_model(folder)


def test_nan_pixels_are_not_post_processed_into_an_image():
    import torch

    from modeling_unicode import UniCodeImageProcessor

    pixels = torch.zeros(1, 3, 8, 8)
    pixels[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf; the decoder"):
        UniCodeImageProcessor(size=8).postprocess(pixels)


def test_two_exports_into_one_folder_at_once_are_refused(tmp_path):
    from training.run_guard import folder_lock

    out = tmp_path / "exports" / "unicode-tiny"
    with folder_lock(out, "unicode-mllm export run exports/unicode-tiny"):
        with pytest.raises(ValueError, match=r"being written by pid \d+ .*unicode-mllm export run"):
            main(["export", str(tmp_path / "run"), str(out)])
    assert not out.exists()


def test_flipped_bytes_inside_saved_weights_are_caught(tmp_path):
    from utils_mllm import tiny_mllm

    from training.checkpointing import atomic_directory
    from training.sft import load_unicode_model

    model, _ = tiny_mllm()
    folder = tmp_path / "mllm"
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
    assert load_unicode_model(folder) is not None  # intact: loads
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])  # still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is not the file that was saved .*SHA-256"):
        load_unicode_model(folder)
