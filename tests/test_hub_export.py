"""hub_upload export: the Hub folder layout, remote code loading in a clean interpreter, the model card
from report.json, the LoRA adapter, and refusals of folders that are not trained runs."""

import json
import subprocess
import sys

import PIL.Image
import pytest
import torch
from hub_fixtures import REPO_ROOT, REPORT, clean_env, reference_outputs, run_probe, write_tiny_run
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from utils_mllm import tiny_mllm

from hub_upload.export import AUTO_MAP, REMOTE_CODE_FILES, VISION_TOKENIZER_AUTO_MAP, export_adapter, export_run
from hub_upload.model_card import build_model_card, metric_rows
from hub_upload.run_folder import check_run_folder
from modeling_unicode import UniCodeVisualTokenizer


def cli(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(REPO_ROOT / "outputs" / "test-artifacts" / "cli-home"),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("run") / "tiny")


def test_export_layout_sharding_and_card(tiny_run, tmp_path):
    run, model, _ = tiny_run
    out = export_run(run, tmp_path / "export", max_shard_size="150KB", repo_id="someone/unicode-tiny")

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "unicode"
    assert set(AUTO_MAP) >= {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForImageTextToText",
        "AutoModelForMultimodalLM",
        "AutoProcessor",
        "AutoImageProcessor",
    }
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_unicode.UniCodeProcessor"}
    assert processor_config["image_processor"]["auto_map"] == {
        "AutoImageProcessor": "image_processing_unicode.UniCodeImageProcessor"
    }
    for name in REMOTE_CODE_FILES:  # shipped unchanged, flat
        assert (out / name).read_bytes() == (REPO_ROOT / "modeling_unicode" / name).read_bytes()
    assert not (out / "pipeline_unicode_diffusers.py").exists() and not (out / "__init__.py").exists()
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "samples.png",
        "report.json",
        "README.md",
    ):
        assert (out / name).is_file(), name

    # Sharded safetensors, nothing pickled, and the shards hold exactly the model's weights.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not list(out.rglob("*.bin"))
    weights = {}
    for shard in shards:
        weights.update(load_file(out / shard))
    state = model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name

    # The standalone visual tokenizer stores the MLLM's codebook (the LLM rows), with its own code.
    vision_config = json.loads((out / "vision_tokenizer" / "config.json").read_text())
    assert vision_config["auto_map"] == VISION_TOKENIZER_AUTO_MAP and vision_config["store_codebook"] is True
    vision = UniCodeVisualTokenizer.from_pretrained(out / "vision_tokenizer")
    assert torch.equal(vision.codebook, model.model.codebook())
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(vision.encode(pixels), model.model.encode_images(pixels))

    # The card: metadata, every metric of report.json with its value, the sample grid.
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text" and "custom_code" in card.data.tags
    assert card.data.base_model is None  # the tiny preset's LLM is trained from scratch in stage 0
    assert "trained from scratch" in card.text and "someone/unicode-tiny" in card.text
    for name, value in metric_rows(REPORT):
        assert f"| `{name}` | {value} |" in card.text
    assert "| `stage2/vqa_accuracy` | 0.4219 |" in card.text and "| `stage1/psnr` | 21.73 |" in card.text
    assert "![Samples from the training run](samples.png)" in card.text
    assert "trust_remote_code=True" in card.text and 'generation_mode="image"' in card.text

    # The card's usage snippets run as written (pointed at the export and a real picture).
    snippets = [block.split("```", 1)[0] for block in card.text.split("```python\n")[1:]]
    assert len(snippets) == 2
    PIL.Image.new("RGB", (24, 24), (0, 90, 200)).save(tmp_path / "picture.png")
    code = (
        "\n".join(snippets)
        .replace("someone/unicode-tiny", str(out))
        .replace('"picture.png"', repr(str(tmp_path / "picture.png")))
    )
    code = code.replace('"generated.png"', repr(str(tmp_path / "generated.png")))
    exec(compile(code, "model-card-snippets", "exec"), {})
    assert PIL.Image.open(tmp_path / "generated.png").size == (16, 16)


def test_model_card_numbers_come_from_report():
    report = {
        **REPORT,
        "metrics": {"vqa_accuracy": 0.123456, "fid": 7.0, "steps": 300, "note": "text is skipped"},
        "settings": {"text_model": {"source": "pretrained", "name_or_path": "lmsys/vicuna-7b-v1.5"}},
    }
    card = build_model_card(report, repo_id="a/b")
    assert (
        "| `vqa_accuracy` | 0.1235 |" in card.text
        and "| `fid` | 7 |" in card.text
        and "| `steps` | 300 |" in card.text
    )
    assert "note" not in dict(metric_rows(report))
    assert card.data.base_model == "lmsys/vicuna-7b-v1.5" and "llama2" in card.text and "Apache-2.0" in card.text
    with pytest.raises(ValueError, match="metrics"):
        build_model_card({"metrics": {"only": "text"}})


def test_clean_interpreter_loads_export_through_remote_code(tiny_run, tmp_path):
    """The acceptance test: the CLI exports; a `python -I` process that cannot import this repository's
    packages, with HF_HUB_OFFLINE=1 and its cwd outside the repo, loads every Auto class and generates
    the same ids as the original."""
    run, model, processor = tiny_run
    done = cli("export", run, tmp_path / "export", "--max-shard-size", "150KB")
    assert done.returncode == 0, done.stderr
    image = PIL.Image.fromarray(
        (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    )
    image.save(tmp_path / "image.png")

    loaded = run_probe(
        str(tmp_path / "export"), tmp_path / "image.png", tmp_path / "clean", clean_env(tmp_path, HF_HUB_OFFLINE="1")
    )
    expected = reference_outputs(model, processor, PIL.Image.open(tmp_path / "image.png"))

    assert loaded["blocked_loaded"] == []
    assert loaded["model_module"].startswith("transformers_modules.") and loaded["vision_module"].startswith(
        "transformers_modules."
    )
    assert (loaded["model_class"], loaded["causal_class"], loaded["backbone_class"]) == (
        "UniCodeForConditionalGeneration",
        "UniCodeForConditionalGeneration",
        "UniCodeModel",
    )
    assert (loaded["processor_class"], loaded["image_processor_class"], loaded["vision_class"]) == (
        "UniCodeProcessor",
        "UniCodeImageProcessor",
        "UniCodeVisualTokenizer",
    )
    assert loaded["text_ids"] == expected["text_ids"]
    assert loaded["image_ids"] == expected["image_ids"]
    assert len(loaded["image_ids"][0]) > model.config.image_tokens_per_generation
    assert loaded["vision_codes"] == expected["vision_codes"]
    assert loaded["pixels_shape"] == [1, 3, 16, 16]
    assert loaded["hidden_sum"] == pytest.approx(expected["hidden_sum"], rel=1e-6, abs=1e-6)


def test_lora_adapter_export(tmp_path):
    run, _, _ = write_tiny_run(tmp_path / "run", adapter=True)
    out = export_run(run, tmp_path / "full", include_adapter=True)
    assert (out / "adapter" / "adapter_config.json").is_file() and (
        out / "adapter" / "adapter_model.safetensors"
    ).is_file()

    alone = export_adapter(run, tmp_path / "adapter_only")
    assert sorted(p.name for p in alone.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.json",
        "samples.png",
    ]
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(alone)
    assert config.r == 2 and set(config.target_modules) == {"q_proj", "v_proj"}
    tensors = load_file(alone / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)
    assert ModelCard.load(alone / "README.md").data.library_name == "peft"
    from hub_upload.push import push_folder

    assert push_folder(alone, "me/unicode-tiny-lora", dry_run=True).files == sorted(p.name for p in alone.iterdir())

    no_adapter, _, _ = write_tiny_run(tmp_path / "plain")
    with pytest.raises(ValueError, match="no PEFT adapter"):
        export_run(no_adapter, tmp_path / "x", include_adapter=True)


def test_export_refuses_folders_that_are_not_trained_runs(tiny_run, tmp_path):
    run, _, _ = tiny_run
    with pytest.raises(ValueError, match="is not a directory"):
        check_run_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"missing: mllm/ .*report\.json.*samples\.png"):
        check_run_folder(tmp_path / "empty")

    # A copy of a real run with its report and samples broken or removed: each piece is named.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "samples.png").write_text("not a png")
    (broken / "report.json").write_text(json.dumps({"settings": {}}))
    (broken / "mllm" / "processor_config.json").unlink()
    with pytest.raises(ValueError) as error:
        export_run(broken, tmp_path / "out")
    message = str(error.value)
    assert "not a trained UniCode run folder" in message and "processor_config.json" in message
    assert "'metrics'" in message and "samples.png that is a PNG image" in message
    assert not (tmp_path / "out").exists()

    # The CLI: a clear message on stderr and a non-zero exit, no traceback.
    done = cli("export", tmp_path / "empty", tmp_path / "out2")
    assert (
        done.returncode == 2 and "not a trained UniCode run folder" in done.stderr and "Traceback" not in done.stderr
    )
    assert "report.json" in done.stderr and not (tmp_path / "out2").exists()

    # A non-empty target is not overwritten without asking.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite"):
        export_run(run, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


# A demo-shaped report: what `run_demo` records of a fully fine-tuned run without decompression pre-training.
DEMO_REPORT = {
    "run_dir": "/home/someone/outputs/demo-tiny",
    "metrics": {
        "vqa": {"accuracy": 0.4678, "accuracy_color": 0.31},
        "text_to_image": {"all_correct": 0.0, "color": 0.5},
        "reconstruction": {"psnr": 29.1, "codebook_usage": 0.347},
    },
    "chance": {
        "vqa": {"accuracy": 0.359, "accuracy_color": 0.17},
        "text_to_image": {"all_correct": 0.0, "color": 0.25},
        "vqa_prior_answers": {"color": "red"},
    },
    "ceiling": {"text_to_image": {"all_correct": 0.75, "color": 0.9}},
    "settings": {
        "preset": "tiny",
        "seed": 0,
        "base_model": None,
        "text_model": {"source": "stage0", "architecture": "llama", "hidden_size": 32},
        "budget": {
            "stage0_steps": 150,
            "stage1_steps": 1000,
            "stage1_train_images": 4000,
            "decompress_steps": 0,
            "sft_steps": 2000,
        },
        "decompression_pretraining": False,
        "stage2": {
            "lora": False,
            "reinit_decoder": True,
            "decoder_layers": 2,
            "output_head": "trained",
            "tasks": ["caption", "vqa", "text_to_image"],
        },
        "vision_tokenizer": {
            "image_size": 16,
            "quantizer": "rq",
            "depth": 2,
            "codebook_size": 256,
            "paradigm": "iterative",
            "code_grid_size": 4,
        },
        "llm_path": "/home/someone/outputs/demo-tiny/text_lm",
    },
    "wall_seconds": {"stage1_tokenizer": 279.0, "total": 592.0},
    "versions": {"torch": torch.__version__},
}


def test_card_from_what_the_run_did_passes_model_card_validation_and_names_no_machine_path(tmp_path):
    from hub_upload.model_card import check_model_card

    run, _, _ = write_tiny_run(tmp_path / "runs" / "demo-tiny", report=DEMO_REPORT)
    done = cli("export", run, tmp_path / "exports" / "unicode-tiny")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "exports" / "unicode-tiny" / "README.md").read_text()
    card = check_model_card(ModelCard(text))  # huggingface_hub's parser, metadata errors raised
    for machine in (str(tmp_path), "/home/someone", str(REPO_ROOT)):
        assert machine not in text

    assert text.split("---\n", 2)[2].lstrip().startswith("# unicode-tiny\n")  # the folder's name, no repo id given
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license, data.base_model) == (
        "transformers",
        "image-text-to-text",
        "apache-2.0",
        None,
    )
    assert data.model_name == "unicode-tiny"
    results = {r.metric_name: (r.task_type, r.metric_value) for r in data.eval_results}
    assert results["vqa/accuracy"] == ("visual-question-answering", 0.4678)
    assert results["text_to_image/all_correct"] == ("text-to-image", 0.0) and len(results) == 6
    assert "| `vqa/accuracy` | 0.4678 | 0.359 | – |" in text
    assert "| `text_to_image/all_correct` | 0 | 0 | 0.75 |" in text
    # The base LLM by architecture and size; the recipe as the run recorded it: full fine-tuning, no decompression.
    assert "a 1-layer, 32-wide Llama (" in text and "trained from scratch by this run" in text
    recipe = text.split("## Training recipe", 1)[1].split("Settings of this run", 1)[0]
    assert "full fine-tuning of 2 freshly drawn decoder layers" in recipe and "2000 steps" in recipe
    assert "LoRA" not in recipe and "decompression" not in recipe
    assert (
        "Stage I trained the visual tokenizer (RQ, a 4×4×2 code map at 16 px, a codebook of 256 LLM embedding rows) "
        "for 1000" in recipe
    )
    assert "![Samples from the training run](samples.png)" in text and "| `total` | 592 |" in text

    card = ModelCard.load(
        export_run(run, tmp_path / "named", repo_id="me/my-unicode", base_model="owner/base-llm") / "README.md"
    )
    assert card.data.base_model == "owner/base-llm" and "\n# my-unicode\n" in card.content
    with pytest.raises(ValueError, match=r"--base-model\) must be a Hub repo id"):
        export_run(run, tmp_path / "path", base_model=str(run / "mllm"))


def test_a_run_folder_loads_with_only_trust_remote_code(tmp_path):
    """A run's mllm/ (as stage II and `finetune --merge` save it) in a clean interpreter that cannot import this
    repository: with trust_remote_code=True it loads and generates as the original; without, the error names the
    fix."""
    from training.sft import save_mllm

    model, processor = tiny_mllm()
    mllm = save_mllm(model, processor, tmp_path / "run" / "mllm")
    image = PIL.Image.fromarray(
        (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    )
    image.save(tmp_path / "image.png")
    env = clean_env(tmp_path, HF_HUB_OFFLINE="1")
    loaded = run_probe(str(mllm), tmp_path / "image.png", tmp_path / "clean", env, "--mllm-only")
    expected = reference_outputs(model, processor, PIL.Image.open(tmp_path / "image.png"))
    assert loaded["blocked_loaded"] == [] and loaded["model_module"].startswith("transformers_modules.")
    for key in ("text_ids", "image_ids", "vision_codes"):
        assert loaded[key] == expected[key], key

    without = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "from transformers import AutoModelForImageTextToText; "
            f"AutoModelForImageTextToText.from_pretrained({str(mllm)!r})",
        ],
        cwd=tmp_path / "clean",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert without.returncode != 0 and "trust_remote_code=True" in without.stderr


def test_export_files_get_ordinary_modes_and_a_plain_file_is_never_replaced(tiny_run, tmp_path):
    """An export is for sharing: no 0600 weights or 0700 folders left from temporary files. And `--overwrite`
    replaces an export folder, never a file the user named by mistake."""
    import os
    import stat

    run = tiny_run[0]
    out = export_run(run, tmp_path / "export")
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(out):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask, folder
        for file in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, file)).st_mode) == 0o666 & ~umask, file

    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        export_run(run, precious, overwrite=True)
    assert precious.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
