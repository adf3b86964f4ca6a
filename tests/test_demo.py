"""`unicode-mllm demo` end to end on a reduced setting (32 px, 32-wide LM, a few steps per stage):
the run folder's contents, metrics that are measured (a recomputation agrees), resuming (only with
the settings a stage was made with), the CLI."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.demo import DemoArguments, demo_budget, run_demo

REDUCED_BUDGET = {
    "text_scenes": 40,
    "stage0_steps": 2,
    "stage1_steps": 3,
    "stage1_train_images": 16,
    "stage1_eval_images": 4,
    "stage2_train_images": 12,
    "stage2_eval_images": 4,
    "decompress_steps": 2,
    "sft_steps": 3,
    "vqa_images": 3,
    "compositional_images": 2,
    "generation_prompts": 3,
    "reconstruction_images": 3,
    "usage_images": 5,
    "guidance_scale": 2.0,
}
TEXT_MODEL = {
    "vocab_size": 600,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
VISION = {"image_size": 32, "base_channels": 8, "channel_multipliers": [1, 2, 2, 2], "z_channels": 8, "code_dim": 32}


def reduced(folder: Path, **extra) -> DemoArguments:
    return DemoArguments(
        output_dir=str(folder),
        budget=REDUCED_BUDGET,
        text_model_overrides=TEXT_MODEL,
        vision_overrides=VISION,
        codebook_size=128,
        quiet=True,
        **extra,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "run"
    return folder, run_demo(reduced(folder))


def test_demo_writes_the_run_folder_of_the_design(demo_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hub_upload.run_folder import check_run_folder

    folder, report = demo_run
    checked = check_run_folder(folder)  # what export/push need: mllm/, report.json, samples.png
    from training.presets import load_preset

    if load_preset("tiny", "recipes")["stage2"].get("lora", True):
        assert checked.adapter() == folder / "adapter"
    else:  # full fine-tuning: no adapter, and export says so instead of shipping a stale one
        assert not (folder / "adapter").exists() and not (folder / "stage2" / "sft" / "adapter").exists()
        with pytest.raises(ValueError, match="no PEFT adapter"):
            checked.adapter()
    for name in ("text_lm", "vision_tokenizer", "mllm", "stage2/decompress/model"):
        assert (folder / name / "COMPLETE").is_file(), name
    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(report))
    markdown = (folder / "report.md").read_text()
    assert "| **overall** |" in markdown and "all_correct" in markdown and "stage1_tokenizer" in markdown
    assert "ceiling (true image through the visual tokenizer)" in markdown
    # Stage 0's LLM never read English: the report says its perplexity is no evidence of language kept.
    assert report["language"]["llm_from_scratch"] is True and "it never knew English" in markdown
    from PIL import Image

    samples = Image.open(folder / "samples.png")
    assert samples.width >= 8 * 128 and samples.height >= 4 * 128
    assert Image.open(folder / "generated.png").size == (32, 32) and Image.open(folder / "question.png").height > 256
    model = AutoModelForImageTextToText.from_pretrained(folder / "mllm")
    processor = AutoProcessor.from_pretrained(folder / "mllm")
    assert type(model).__name__ == "UniCodeForConditionalGeneration" and type(processor).__name__ == "UniCodeProcessor"
    settings = report["settings"]
    # Trained in stage 0: no Hub id to name (the card describes the LLM instead), and never the run's local path.
    assert settings["base_model"] is None and settings["vision_tokenizer"]["codebook_size"] == 128
    assert settings["stage2"]["lora"] is False and settings["decompression_pretraining"] is True
    # the model preset says how the LLM reads an image, and the trained model carries it
    assert settings["visual_input"] == load_preset("tiny")["visual_input"] == model.config.visual_input
    assert processor.num_image_tokens == model.config.image_seq_length
    assert set(report["wall_seconds"]) >= {
        "stage0_text_lm",
        "stage1_tokenizer",
        "code_datasets",
        "stage2_decompress",
        "stage2_sft",
        "evaluation",
        "total",
    }
    assert all(v > 0 for v in report["wall_seconds"].values())
    assert report["versions"]["torch"] and report["versions"]["transformers"]


def test_report_metrics_are_measured_not_constants(demo_run):
    """Recompute reconstruction PSNR / usage and the VQA chance level from the saved model and the
    same data: they must match the report; the question counts follow the data."""
    from training.data.shapes import build_split
    from training.evaluation import (
        evaluate_codebook_usage,
        evaluate_reconstruction,
        evaluate_vqa,
        majority_answers,
        train_question_rows,
    )
    from training.stage2 import load_model_and_processor

    folder, report = demo_run
    metrics, chance = report["metrics"], report["chance"]
    model, processor = load_model_and_processor(folder / "mllm")
    test = build_split("test", 3, image_size=32, seed=0)
    recon = evaluate_reconstruction(model, list(test["image"]))
    assert recon["psnr"] == pytest.approx(metrics["reconstruction"]["psnr"], rel=1e-6)
    # Usage is measured on its own, larger sample (`usage_images`): the codes of those images, recomputed.
    usage_test = build_split("test", 5, image_size=32, seed=0)
    usage = evaluate_codebook_usage(model, usage_test["image"])
    assert usage["usage"] == pytest.approx(metrics["reconstruction"]["codebook_usage"])
    assert report["counts"]["usage_images"] == 5 and report["counts"]["reconstruction_images"] == 3
    assert usage["usage"] >= recon["usage"]  # a superset of the reconstruction images' codes
    assert 0 < metrics["reconstruction"]["codebook_usage"] <= 1 and 0 < metrics["reconstruction"]["psnr"] < 60
    prior = majority_answers(train_question_rows(12, 0))
    assert chance["vqa_prior_answers"] == prior
    vqa = evaluate_vqa(model, processor, test, prior, swapped_images=True)
    assert vqa["model"]["accuracy"] == pytest.approx(metrics["vqa"]["accuracy"])
    assert vqa["swapped"]["accuracy"] == pytest.approx(metrics["vqa_swapped_images"]["accuracy"])
    assert vqa["chance"]["accuracy"] == pytest.approx(chance["vqa"]["accuracy"])
    assert report["counts"]["vqa_questions"] == sum(len(q) for q in test["questions"])
    # The text-to-image ceiling: the requested scenes rendered, through the model's tokenizer, parsed.
    from training.data.shapes import render_scene
    from training.evaluation import reconstruct_images, single_shape_prompts
    from training.metrics import load_metric

    scenes = [s for _, s in single_shape_prompts(3, 32, 0)]
    ceiling = load_metric("scene_match").compute(
        predictions=reconstruct_images(model, [render_scene(s) for s in scenes])[0], references=scenes
    )
    assert report["ceiling"]["text_to_image"]["all_correct"] == pytest.approx(ceiling["all_correct"])
    assert report["ceiling"]["text_to_image"]["unparseable"] == pytest.approx(ceiling["unparseable"])
    for section in ("vqa", "vqa_compositional", "vqa_swapped_images", "text_to_image"):
        assert all(0.0 <= v <= 1.0 for v in metrics[section].values())
    assert set(report["goals_met"]) == set(demo_budget("tiny")["goals"])


def test_generated_codes_are_the_drawn_images_and_sampling_settings_reach_generate(demo_run):
    """`generate_images(..., return_codes=True)` (used by scripts/generation_probe.py) returns the ids
    its images were decoded from; top-1 sampling must reproduce greedy decoding."""
    import torch

    from training.evaluation import generate_images, single_shape_prompts
    from training.stage2 import load_model_and_processor

    folder, _ = demo_run
    model, processor = load_model_and_processor(folder / "mllm")
    captions = [c for c, _ in single_shape_prompts(3, 32, 0)]
    images, codes = generate_images(model, processor, captions, 3.0, return_codes=True)
    assert codes.shape == (3, model.config.image_tokens_per_generation)
    assert set(codes.flatten().tolist()) <= set(model.config.vq_config.codebook_token_ids)
    pixels = model.decode_image_tokens(codes)
    redrawn = processor.post_process_multimodal_output(pixels, generation_mode="image")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, redrawn))
    _, top1 = generate_images(model, processor, captions, 3.0, return_codes=True, do_sample=True, top_k=1)
    assert torch.equal(top1, codes)
    _, sampled = generate_images(model, processor, captions, 3.0, return_codes=True, do_sample=True, top_k=0, seed=1)
    assert not torch.equal(sampled, codes)  # without the top-k cut, sampling from 128 codes differs from greedy


def test_rerun_reuses_every_training_stage(demo_run):
    folder, first = demo_run
    mtime = (folder / "mllm" / "COMPLETE").stat().st_mtime
    again = run_demo(reduced(folder))
    assert all(
        again["reused"][s]
        for s in ("stage0_text_lm", "stage1_tokenizer", "code_datasets", "stage2_decompress", "stage2_sft")
    )
    assert (folder / "mllm" / "COMPLETE").stat().st_mtime == mtime
    # Reused stages keep the seconds measured when they ran; evaluation is deterministic (greedy).
    assert again["wall_seconds"]["stage1_tokenizer"] == first["wall_seconds"]["stage1_tokenizer"]
    assert again["metrics"] == first["metrics"]


@pytest.fixture
def run_copy(demo_run, tmp_path):
    """A copy of the module's finished run, so a test that changes settings cannot spoil it."""
    copy = tmp_path / "run"
    shutil.copytree(demo_run[0], copy)
    return copy


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_rerun_with_other_settings_stops_and_keeps_every_folder(run_copy):
    before = _snapshot(run_copy)
    with pytest.raises(
        ValueError, match=r"stage2_sft: \S+stage2/sft was made with other settings: sft_steps: 3 -> 4\."
    ) as error:
        run_demo(replace(reduced(run_copy), budget={**REDUCED_BUDGET, "sft_steps": 4}))
    assert "--output" in str(
        error.value
    ) and f"delete {run_copy / 'stage2/sft'}, {run_copy / 'mllm'} to retrain" in str(error.value)
    # A changed upstream stage is named first: its output and everything after it are stale.
    with pytest.raises(
        ValueError,
        match=r"stage1_tokenizer: \S+vision_tokenizer was made with other settings: "
        r"stage1_steps: 3 -> 4\.",
    ):
        run_demo(replace(reduced(run_copy), budget={**REDUCED_BUDGET, "stage1_steps": 4, "sft_steps": 4}))
    with pytest.raises(ValueError, match=r"stage1_tokenizer: .*vision_tokenizer.code_dim: 32 -> 16"):
        run_demo(replace(reduced(run_copy), vision_overrides={**VISION, "code_dim": 16}))
    assert _snapshot(run_copy) == before
    # A dual stage I also trained the LLM (llm/): it is stale with the tokenizer, and named with it.
    (run_copy / "llm").mkdir()
    with pytest.raises(ValueError, match=r"stage1_tokenizer: .*") as error:
        run_demo(replace(reduced(run_copy), budget={**REDUCED_BUDGET, "stage1_steps": 4}))
    assert f"{run_copy / 'stage1'}, {run_copy / 'llm'}, " in str(error.value)


def test_stages_made_from_data_an_older_version_generated_are_not_reused(run_copy, monkeypatch):
    """The Shapes world and the stage-II task rows are code, not settings; their fingerprints are recorded,
    so a changed generator (e.g. "a orange" -> "an orange") makes the stages built on its output stale."""
    import training.data.shapes as shapes
    import training.tasks as tasks

    before = _snapshot(run_copy)
    monkeypatch.setattr(shapes, "indefinite_article", lambda word: "a")  # the old text
    with pytest.raises(
        ValueError,
        match=r"stage0_text_lm: \S+text_lm was made with other settings: "
        r"shapes_world_sha256: '[0-9a-f]{16}' -> '[0-9a-f]{16}'\.",
    ):
        run_demo(reduced(run_copy))
    monkeypatch.undo()
    monkeypatch.setattr(tasks.templates, "VQA", ("{question} Reply in one word.",))
    with pytest.raises(
        ValueError,
        match=r"stage2_decompress: \S+stage2/decompress was made with other settings: "
        r"task_rows_sha256: ",
    ):
        run_demo(reduced(run_copy))
    assert _snapshot(run_copy) == before


def test_interrupted_stage_is_not_resumed_with_other_settings(run_copy):
    """An interrupted SFT (its checkpoints there, mllm/ not complete) resumes only under the settings it
    started with; the record of those is written before the stage runs."""
    records = json.loads((run_copy / "demo_stages.json").read_text())
    assert records["stage2_sft (started)"] == records["stage2_sft"]
    (run_copy / "mllm" / "COMPLETE").unlink()  # as if the run stopped before the merged model was done
    before = _snapshot(run_copy)
    with pytest.raises(
        ValueError,
        match=r"stage2_sft: an interrupted run of it left \S+stage2/sft, \S+mllm, started "
        r"with other settings: sft_steps: 3 -> 4\. Its checkpoints are kept",
    ):
        run_demo(replace(reduced(run_copy), budget={**REDUCED_BUDGET, "sft_steps": 4}))
    assert _snapshot(run_copy) == before


def test_folder_without_a_record_of_its_settings_is_not_reused(run_copy):
    (run_copy / "demo_stages.json").unlink()  # as a run folder made before the records existed
    with pytest.raises(
        ValueError, match=r"stage0_text_lm: \S+text_lm is complete but \S+ has no record of the settings"
    ):
        run_demo(reduced(run_copy))
    assert (run_copy / "text_lm" / "COMPLETE").is_file() and not (run_copy / "demo_stages.json").exists()


def test_cli_prints_the_settings_error_without_a_traceback(run_copy, capsys):
    """The CLI's flags cannot reproduce the reduced test settings, so its first stage differs: the
    command says so in one message and exits 2, before any work."""
    from training.cli import main

    before = _snapshot(run_copy)
    assert main(["demo", "--output", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("unicode-mllm demo: error: stage0_text_lm: ") and "Traceback" not in err and "--output" in err
    )
    assert _snapshot(run_copy) == before


def test_a_device_that_cannot_run_is_refused_before_any_work(tmp_path, capsys):
    import torch

    from training.cli import main
    from training.demo import DemoArguments, DemoSettingsError, run_demo

    with pytest.raises(DemoSettingsError, match="device='gpu' is not supported; use 'cpu' or 'cuda'"):
        run_demo(DemoArguments(output_dir=str(tmp_path / "run"), device="gpu"))
    if torch.cuda.is_available():
        return
    with pytest.raises(DemoSettingsError, match="torch sees no CUDA device; drop --device cuda"):
        run_demo(DemoArguments(output_dir=str(tmp_path / "run"), device="cuda"))
    assert main(["evaluate", "--model", "someone/no-such-model", "--device", "cuda"]) == 2
    assert "--device 'cuda' but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_demo_under_a_launcher_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    """Measured: `accelerate launch --num_processes 2 -m training.cli demo` had both ranks assemble stage2/base at
    once and one died reading the other's half-written folder. The demo is a one-process job and says so."""
    from training.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the demo runs in one process, but this is one of 2" in err and "train --stage sft" in err
    assert not (tmp_path / "run").exists()


def test_evaluate_command_gives_the_demo_reports_figures_for_its_model(demo_run, tmp_path, capsys):
    """`unicode-mllm evaluate` on a run's mllm/ with the run's own counts and seed reproduces its report."""
    from training.cli import main

    folder, report = demo_run
    counts = [
        "--vqa-images",
        "3",
        "--compositional-images",
        "2",
        "--generation-prompts",
        "3",
        "--reconstruction-images",
        "3",
        "--usage-images",
        "5",
        "--prior-scenes",
        "12",
        "--guidance-scale",
        "2.0",
    ]
    assert main(["evaluate", "--model", str(folder / "mllm"), *counts, "--output", str(tmp_path / "eval")]) == 0
    written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    for section in ("metrics", "chance", "ceiling", "counts"):
        assert written[section] == json.loads(json.dumps(report[section])), section
    assert "| **overall** |" in capsys.readouterr().out
    assert (tmp_path / "eval" / "evaluation.md").read_text().startswith("# UniCode evaluation")


def test_a_model_trained_elsewhere_exports_after_evaluate(demo_run, tmp_path):
    """A merged fine-tune has no run folder. Put it in one as mllm/, let `evaluate --output` write the report
    (evaluation.json) and samples.png beside it, and that folder exports like a demo run."""
    import shutil

    from hub_upload.export import export_run
    from hub_upload.run_folder import check_run_folder
    from training.cli import main

    run = tmp_path / "my_run"
    shutil.copytree(demo_run[0] / "mllm", run / "mllm")
    counts = ["--vqa-images", "2", "--compositional-images", "2", "--generation-prompts", "2", "--usage-images", "2"]
    assert main(["evaluate", "--model", str(run / "mllm"), *counts, "--output", str(run)]) == 0
    assert (run / "samples.png").read_bytes().startswith(b"\x89PNG")
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert check_run_folder(run).report_file == "evaluation.json"
    out = export_run(run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["auto_map"]
    assert json.loads((out / "report.json").read_text()) == evaluation
    # The card's PSNR, read back as a number (its formatting is the card's business, not this test's).
    card = (out / "README.md").read_text()
    quoted = [float(x) for x in re.findall(r"psnr\D{0,40}?(\d+\.\d+)", card, flags=re.I)]
    assert any(abs(x - evaluation["metrics"]["reconstruction"]["psnr"]) < 0.01 for x in quoted), quoted


def test_evaluate_runs_the_whole_model_in_the_precision_asked_for(demo_run, tmp_path, monkeypatch):
    """`--dtype bfloat16` evaluates the model as it would be served: every weight (the visual tokenizer's too) in
    bfloat16, fed by the processor's float32 pixels."""
    import torch

    import training.evaluation as evaluation
    from training.cli import main

    mllm = demo_run[0] / "mllm"
    counts = ["--vqa-images", "2", "--compositional-images", "2", "--generation-prompts", "2", "--usage-images", "2"]
    for dtype in ("float32", "bfloat16"):
        assert (
            main(["evaluate", "--model", str(mllm), "--dtype", dtype, *counts, "--output", str(tmp_path / dtype)]) == 0
        )
    full, half = (json.loads((tmp_path / dtype / "evaluation.json").read_text()) for dtype in ("float32", "bfloat16"))
    assert half["settings"]["dtype"] == "bfloat16"
    assert half["metrics"]["reconstruction"]["psnr"] == pytest.approx(
        full["metrics"]["reconstruction"]["psnr"], abs=0.5
    )
    seen = []
    monkeypatch.setattr(evaluation, "evaluate_on_shapes", lambda model, processor, **options: seen.append(model) or {})
    with pytest.raises(Exception):
        main(["evaluate", "--model", str(mllm), "--dtype", "bfloat16"])  # stops after the capture
    assert {parameter.dtype for parameter in seen[0].parameters()} == {torch.bfloat16}


def test_evaluate_with_an_adapter_equals_evaluating_the_merged_model(demo_run, tmp_path, monkeypatch):
    """`--adapter` (a LoRA fine-tune left unmerged, as `unicode-mllm finetune` leaves it) gives exactly the
    figures of the same adapter merged by hand."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor

    from training.cli import main
    from training.sft import load_adapter_model, load_unicode_model

    mllm = demo_run[0] / "mllm"
    torch.manual_seed(0)  # init_lora_weights=False: a non-zero update, so the adapter changes the model
    lora = get_peft_model(
        load_unicode_model(mllm), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    merged = load_adapter_model(mllm, tmp_path / "adapter").merge_and_unload()
    base = load_unicode_model(mllm)
    name = next(n for n, _ in merged.named_parameters() if n.endswith("q_proj.weight"))
    assert not torch.equal(dict(merged.named_parameters())[name], dict(base.named_parameters())[name])
    merged.save_pretrained(tmp_path / "merged")
    AutoProcessor.from_pretrained(mllm).save_pretrained(tmp_path / "merged")
    counts = ["--vqa-images", "3", "--compositional-images", "2", "--generation-prompts", "2", "--usage-images", "3"]
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(mllm),
                "--adapter",
                str(tmp_path / "adapter"),
                *counts,
                "--output",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert main(["evaluate", "--model", str(tmp_path / "merged"), *counts, "--output", str(tmp_path / "b")]) == 0
    with_adapter, by_hand = (json.loads((tmp_path / out / "evaluation.json").read_text()) for out in ("a", "b"))
    assert with_adapter["adapter"] == str(tmp_path / "adapter") and with_adapter["metrics"] == by_hand["metrics"]
    assert main(["evaluate", "--model", str(mllm), "--adapter", str(tmp_path)]) == 2  # no adapter_config.json there
    # The evaluated model is the merged one (a few scenes may not show the difference in the figures).
    import training.evaluation as evaluation

    class Captured(Exception):
        pass

    def capture(model, processor, **counts):
        raise Captured(model)

    monkeypatch.setattr(evaluation, "evaluate_on_shapes", capture)
    with pytest.raises(Captured) as captured:
        main(["evaluate", "--model", str(mllm), "--adapter", str(tmp_path / "adapter")])
    seen = captured.value.args
    assert torch.equal(dict(seen[0].named_parameters())[name], dict(merged.named_parameters())[name])


@pytest.mark.parametrize(
    "target, message",
    [
        (
            "vision_tokenizer",
            "vision_tokenizer/config.json with model_type 'unicode' (found 'unicode_vq'; that is the visual "
            "tokenizer alone",
        ),
        ("stage1", "is not a UniCode MLLM folder; it lacks "),
        ("corrupt", "corrupt/config.json that parses as a JSON object"),
    ],
)
def test_evaluate_names_a_folder_that_is_not_an_mllm(demo_run, tmp_path, capsys, target, message):
    from training.cli import main

    folder = demo_run[0] / target
    if target == "corrupt":  # a copy of mllm/ whose config.json was cut short
        import shutil

        folder = shutil.copytree(demo_run[0] / "mllm", tmp_path / "corrupt")
        (folder / "config.json").write_text('{"model_type": "unic')
    assert main(["evaluate", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unicode-mllm evaluate: error: --model ") and message in err and "Traceback" not in err


def test_evaluate_refuses_a_zero_count_before_loading_the_model(demo_run, capsys):
    from training.cli import main

    assert main(["evaluate", "--model", str(demo_run[0] / "mllm"), "--vqa-images", "0"]) == 2
    assert "--vqa-images 0 must be a whole number of at least 1" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(demo_run[0] / "mllm"), "--guidance-scale", "0"]) == 2
    assert "--guidance-scale 0.0 must be a positive number" in capsys.readouterr().err


def test_budget_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown keys \\['stage9_steps'\\]"):
        demo_budget("tiny", {"stage9_steps": 1})
    with pytest.raises(ValueError, match=r"budget vqa_images=0 must be a whole number of at least 1"):
        demo_budget("tiny", {"vqa_images": 0})
    with pytest.raises(ValueError, match=r"budget decompress_steps=-1 must be .* at least 0 \(0 skips the stage\)"):
        demo_budget("tiny", {"decompress_steps": -1})
    with pytest.raises(ValueError, match=r"guidance_scale=-2.0 must be a positive number"):
        demo_budget("tiny", {"guidance_scale": -2.0})
    with pytest.raises(ValueError, match=r"budget generation_prompts=1 must be .* at least 2 \(the chance level"):
        demo_budget("tiny", {"generation_prompts": 1})
    assert demo_budget("tiny", {"decompress_steps": 0, "guidance_scale": None})["decompress_steps"] == 0
    with pytest.raises(ValueError, match="device='tpu'"):
        run_demo(DemoArguments(output_dir="unused", device="tpu"))


def test_cli_flags_become_budget_overrides():
    from training.cli import _budget_flags, build_parser

    args = build_parser().parse_args(["demo", "--sft-steps", "5", "--guidance-scale", "2.5", "--device", "cpu"])
    assert _budget_flags(args) == {"sft_steps": 5, "guidance_scale": 2.5}
    assert args.func.__name__ == "_cmd_demo" and args.output is None and args.preset == "tiny"
    ablate = build_parser().parse_args(["ablate", "--factors", "paradigm", "codebook"])
    assert ablate.factors == ["paradigm", "codebook"] and ablate.output == "outputs/ablate"


def test_cli_chooses_the_stage_one_paradigm_quantizer_and_entropy_term(monkeypatch, tmp_path):
    import training.demo as demo
    from training.cli import _vision_flags, build_parser, main

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert (
        main(
            [
                "demo",
                "--output",
                str(tmp_path),
                "--paradigm",
                "frozen",
                "--quantizer",
                "vq",
                "--entropy-weight",
                "0.05",
            ]
        )
        == 0
    )
    assert (seen[0].paradigm, seen[0].quantizer, seen[0].vision_overrides) == (
        "frozen",
        "vq",
        {"entropy_weight": 0.05},
    )
    assert main(["demo", "--output", str(tmp_path)]) == 0  # unset flags leave the preset's choices alone
    assert (seen[1].paradigm, seen[1].quantizer, seen[1].vision_overrides) == (None, None, {})
    tokenizer = build_parser().parse_args(
        ["train-tokenizer", "--entropy-weight", "0.1", "--dead-code-threshold", "0.5"]
    )
    assert _vision_flags(tokenizer) == {"entropy_weight": 0.1}
    assert tokenizer.dead_code_threshold == 0.5  # how stage I learns the codebook: a stage-I argument
    with pytest.raises(SystemExit):  # the ablation varies the paradigm itself
        build_parser().parse_args(["ablate", "--paradigm", "dual"])


def test_small_preset_is_the_paper_hq_layout_with_its_own_demo_budget():
    from training.presets import list_presets, vision_tokenizer_config

    assert "small" in list_presets() and "small" in list_presets("recipes")
    config = vision_tokenizer_config("small")
    assert config.quantizer == "hq" and config.tokens_per_image == 320
    budget = demo_budget("small")
    assert budget["sft_steps"] > demo_budget("tiny")["sft_steps"] and budget["goals"]["vqa_accuracy"] == 0.98


def test_swapped_image_vqa_asks_each_question_about_the_next_scene(monkeypatch):
    """The image-reliance check: every question is asked twice, with its own scene's image and with
    the next scene's (cyclically), and the swapped answers are scored against the true answers."""
    from training import evaluation
    from training.data.shapes import build_split

    test = build_split("test", 3, image_size=32, seed=0)
    calls = []

    def fake_answers(model, processor, images, questions, **kwargs):
        calls.append(list(images))
        # Answers right only when asked about the question's own scene: the first call.
        truth = [qa["answer"] for row in test for qa in row["questions"]]
        return truth if len(calls) == 1 else ["?"] * len(questions)

    monkeypatch.setattr(evaluation, "answer_questions", fake_answers)
    result = evaluation.evaluate_vqa(None, None, test, prior={}, swapped_images=True)
    own, swapped = calls
    per_scene = [len(row["questions"]) for row in test]
    starts = [sum(per_scene[:i]) for i in range(3)]
    for scene, start in enumerate(starts):
        assert swapped[start].tobytes() == test[(scene + 1) % 3]["image"].tobytes()
    assert result["model"]["accuracy"] == 1.0 and result["swapped"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="at least 2 scenes"):
        evaluation.evaluate_vqa(
            None, None, build_split("test", 1, image_size=32, seed=0), prior={}, swapped_images=True
        )


def test_a_model_preset_says_how_the_llm_reads_an_image():
    from training.presets import load_preset, preset_visual_input

    assert preset_visual_input("tiny") == load_preset("tiny")["visual_input"]
    assert preset_visual_input({"text_model": {}}) == "aggregate"  # the paper's, when a preset does not say
    with pytest.raises(ValueError, match="the model preset's visual_input='concat' is not one of"):
        preset_visual_input({"visual_input": "concat"})


def test_small_preset_vocabulary_fits_the_offline_text_corpus():
    """Stage 0 of `small` fits its BPE to the offline corpus; a vocab_size above what that corpus
    supports stopped `demo --preset small` before any training."""
    from training.data.shapes import text_corpus
    from training.presets import load_preset
    from training.text_lm import stdlib_docstrings, train_text_tokenizer

    text_model = load_preset("small")["text_model"]
    texts = list(text_corpus(num_scenes=demo_budget("small")["text_scenes"], seed=0))
    tokenizer = train_text_tokenizer([*stdlib_docstrings(), *texts], text_model["vocab_size"])
    assert len(tokenizer) >= load_preset("small")["vision_tokenizer"]["codebook_size"]


def test_turning_decompression_off_retrains_sft_from_the_base(run_copy):
    """A folder whose earlier run pre-trained decompression: with decompression off (and the stale SFT
    deleted, as the settings error says), SFT starts from stage2/base, not the decompression model."""
    assert (run_copy / "stage2" / "decompress" / "model" / "COMPLETE").is_file()
    shutil.rmtree(run_copy / "stage2" / "sft")
    shutil.rmtree(run_copy / "mllm")
    run_demo(replace(reduced(run_copy), budget={**REDUCED_BUDGET, "decompress_steps": 0}))
    metrics = json.loads((run_copy / "stage2" / "sft" / "metrics.json").read_text())
    assert metrics["base"] == str(run_copy / "stage2" / "base")


def test_learning_benchmark_trains_each_variant_for_its_seconds_or_steps_and_tables_them(demo_run, tmp_path):
    """benchmarks/learning.py on a finished run folder: a trained variant and a decoding-only row of its model,
    each a result.json with the table's figures, and the table prints every row."""
    import subprocess
    import sys

    from transformers import AutoProcessor

    folder, _ = demo_run
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "learning.py"
    common = [
        "--run",
        str(folder),
        "--work",
        str(tmp_path),
        "--seeds",
        "0",
        "--seconds",
        "2",
        "--vqa-images",
        "3",
        "--generation-prompts",
        "2",
        "--eval-images",
        "4",
    ]
    variants = [
        "head=train_images:12,output_head:trained,loss_normalization:row,curriculum_rows:one_shape,curriculum_steps:1",
        "sampled=decode:head,top_k:5,guidance:2.0",
    ]
    done = subprocess.run(
        [sys.executable, str(script), *common, "--variants", *variants], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    head = json.loads((tmp_path / "head-s0" / "result.json").read_text())
    sampled = json.loads((tmp_path / "sampled-s0" / "result.json").read_text())
    assert head["steps"] >= 1 and head["sft_seconds"] >= 2 and head["tokens_per_second"] > 0
    assert head["settings"]["output_head"] == "trained" and head["settings"]["loss_normalization"] == "row"
    assert head["settings"]["curriculum_steps"] == 1  # a curriculum through train_stage2
    assert set(head["code_nats"]) == {"background", "shape"} and all(v > 0 for v in head["code_nats"].values())
    assert (
        0 <= head["vqa"]["accuracy"] <= 1
        and "accuracy" in head["vqa_swapped"]
        and "all_correct" in head["t2i_ceiling"]
    )
    assert sampled["trained_by"] == "head" and sampled["settings"]["top_k"] == 5 and sampled["steps"] == head["steps"]
    assert (
        sampled["vqa"] == head["vqa"] and sampled["code_nats"] == head["code_nats"]
    )  # decoding changes only the drawings
    assert (tmp_path / "head-s0" / "mllm" / "config.json").is_file() and not (tmp_path / "head-s0" / "stage2").exists()
    rows = [line for line in done.stdout.splitlines() if line.startswith("| head ") or line.startswith("| sampled ")]
    assert (
        len(rows) == 4 and "| VQA |" in done.stdout and "| T2I all-correct |" in done.stdout
    )  # a VQA and a drawing table
    # --steps: equal steps instead of equal seconds
    common[common.index("--work") + 1] = str(tmp_path / "steps")
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            *common,
            "--steps",
            "3",
            "--variants",
            variants[0] + ",vqa_layout:describe_first",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stepped = json.loads((tmp_path / "steps" / "head-s0" / "result.json").read_text())
    assert stepped["steps"] == stepped["steps_budget"] == 3 and stepped["seconds_budget"] is None
    assert stepped["settings"]["vqa_layout"] == "describe_first" and 0 <= stepped["vqa"]["accuracy"] <= 1
    # the layout travels with the saved model, so whoever loads it asks as it was trained
    assert AutoProcessor.from_pretrained(tmp_path / "steps" / "head-s0" / "mllm").vqa_layout == "describe_first"
    # --rescore: the kept models scored again on a larger evaluation set; training figures stand
    common[common.index("--work") + 1] = str(tmp_path)
    common[common.index("--vqa-images") + 1] = "4"
    done = subprocess.run(
        [sys.executable, str(script), *common, "--rescore"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("head", "sampled"):
        again = json.loads((tmp_path / f"{name}-s0" / "result.json").read_text())
        assert (again["vqa_images"], again["generation_prompts"]) == (4, 2)
        assert again["steps"] == head["steps"] and again["code_nats"] == head["code_nats"]
    assert again["settings"]["top_k"] == 5 and "| VQA scenes |" in done.stdout


def test_goal_margins_over_chance_and_over_swapped_images():
    """The recipe's margin goals: every question type `margin` above its prior-only answer, and the overall accuracy
    `margin` above the same questions asked about other scenes' images; one-shape VQA is a goal of its own."""
    from training.demo import _goal_checks

    metrics = {
        "vqa": {"accuracy": 0.50, "accuracy_color": 0.30, "accuracy_size": 0.58},
        "vqa_swapped_images": {"accuracy": 0.41},
        "vqa_one_shape": {"accuracy": 0.86},
    }
    chance = {"vqa": {"accuracy": 0.33, "accuracy_color": 0.14, "accuracy_size": 0.52}}
    goals = {
        "vqa_margin_over_chance_every_type": 0.05,
        "vqa_margin_over_swapped_images": 0.10,
        "vqa_above_chance_every_type": True,
        "vqa_one_shape_accuracy": 0.85,
    }
    assert _goal_checks(metrics, chance, goals) == {
        "vqa_margin_over_chance_every_type": True,
        "vqa_margin_over_swapped_images": False,
        "vqa_above_chance_every_type": True,
        "vqa_one_shape_accuracy": True,
    }
    metrics["vqa"]["accuracy_size"] = 0.55  # above its chance, but by less than the margin
    metrics["vqa_swapped_images"]["accuracy"] = 0.40
    checks = _goal_checks(metrics, chance, goals)
    assert not checks["vqa_margin_over_chance_every_type"] and checks["vqa_above_chance_every_type"]
    assert checks["vqa_margin_over_swapped_images"]


def test_small_recipe_runs_end_to_end_at_reduced_size(tmp_path):
    """The GPU preset's recipe (HQ codes, the learning benchmark's stage-II levers) through the whole demo on CPU at
    toy size: its MLLM has the trained head and both position tables, and the codebook rows are the LLM's, unmoved."""
    import torch

    from training.stage2 import load_model_and_processor

    report = run_demo(
        DemoArguments(
            output_dir=str(tmp_path / "run"),
            preset="small",
            budget=REDUCED_BUDGET,
            text_model_overrides={**TEXT_MODEL, "vocab_size": 600},
            vision_overrides=VISION,
            codebook_size=128,
            quiet=True,
        )
    )
    assert report["settings"]["preset"] == "small"
    model, _ = load_model_and_processor(tmp_path / "run" / "mllm")
    assert model.config.vq_config.quantizer == "hq" and not model.config.tie_word_embeddings
    assert model.model.image_position_embedding is not None and model.model.code_position_embedding is not None
    base, _ = load_model_and_processor(tmp_path / "run" / "stage2" / "base")
    rows = torch.as_tensor(model.config.vq_config.codebook_token_ids)
    assert torch.equal(model.get_input_embeddings().weight[rows], base.get_input_embeddings().weight[rows])


def test_vqa_is_also_scored_on_one_shape_and_on_multi_shape_scenes(monkeypatch):
    """The split the goals name: questions about scenes of one shape, and about scenes of two or three, scored
    apart."""
    import json as json_module

    from training import evaluation
    from training.data.shapes import build_split

    test = build_split("test", 12, image_size=32, seed=0)
    shapes = [len(json_module.loads(row["scene"])["objects"]) for row in test]
    assert 1 in shapes and max(shapes) > 1
    # Right about every one-shape scene, wrong about every other.
    truth = [qa["answer"] if n == 1 else "?" for row, n in zip(test, shapes) for qa in row["questions"]]
    monkeypatch.setattr(evaluation, "answer_questions", lambda model, processor, images, questions, **kw: truth)
    result = evaluation.evaluate_vqa(None, None, test, prior={})
    one = sum(len(row["questions"]) for row, n in zip(test, shapes) if n == 1)
    assert result["model_one_shape"]["accuracy"] == 1.0 and result["model_multi_shape"]["accuracy"] == 0.0
    assert result["model"]["accuracy"] == pytest.approx(one / len(truth))


def test_demo_model_follows_the_tiny_recipes_stage_two(demo_run):
    """The demo's MLLM is what `tiny`'s stage-II recipe asks for: its number of fresh layers, a head of its own,
    both position tables; and its codebook rows are still the stage-0 LLM's."""
    import torch

    from training.presets import load_preset
    from training.stage2 import load_model_and_processor

    folder, _ = demo_run
    recipe = load_preset("tiny", "recipes")["stage2"]
    model, _ = load_model_and_processor(folder / "mllm")
    assert len(model.model.language_model.layers) == recipe["decoder_layers"]
    assert (not model.config.tie_word_embeddings) == (recipe["output_head"] == "trained")
    assert (model.model.image_position_embedding is not None) == recipe["image_positions"]
    assert (model.model.code_position_embedding is not None) == recipe["code_positions"]
    base, _ = load_model_and_processor(folder / "stage2" / "base")
    rows = torch.as_tensor(model.config.vq_config.codebook_token_ids)
    assert torch.equal(model.get_input_embeddings().weight[rows], base.get_input_embeddings().weight[rows])


def test_the_readme_export_example_works_on_the_demo_run(demo_run, tmp_path):
    """`unicode-mllm export outputs/demo-tiny exports/unicode-tiny`, as the README writes it: the tiny demo fine-tunes
    fully, so the card says so (no LoRA), names no path of the machine, and the run's mllm/ carries its remote code."""
    from huggingface_hub import ModelCard

    from hub_upload.model_card import check_model_card
    from training.cli import main

    folder, _ = demo_run
    assert json.loads((folder / "mllm" / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
    assert main(["export", str(folder), str(tmp_path / "unicode-tiny")]) == 0
    text = (tmp_path / "unicode-tiny" / "README.md").read_text()
    check_model_card(ModelCard(text))
    assert str(folder) not in text and str(tmp_path) not in text and "\n# unicode-tiny\n" in text
    recipe = text.split("## Training recipe", 1)[1].split("Settings of this run", 1)[0]
    assert (
        "full fine-tuning" in recipe
        and "LoRA" not in recipe
        and "image-decompression pre-training (2 steps)" in recipe
    )
