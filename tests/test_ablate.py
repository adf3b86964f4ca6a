"""`unicode-mllm ablate` on a tiny budget: every factor runs from the shared baseline, reuses what it
may, the separate-codebook variant really uses new vocabulary rows, and the table is written."""

import json

import pytest
from test_demo import REDUCED_BUDGET, TEXT_MODEL, VISION

from training.ablate import FACTORS, claims, run_ablation

OVERRIDES = {
    "text_model_overrides": TEXT_MODEL,
    "vision_overrides": VISION,
    "stage1_overrides": {"dual_sync_interval": 2},
    "codebook_size": 128,
    "quiet": True,
}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    return out, run_ablation(
        out,
        factors=["paradigm", "decompression", "codebook", "visual_input"],
        budget=REDUCED_BUDGET,
        demo_overrides=OVERRIDES,
    )


def test_table_has_a_measured_row_per_variant(ablation):
    out, table = ablation
    expected = {
        "baseline",
        "paradigm=frozen",
        "paradigm=dual",
        "decompression=off",
        "codebook=separate",
        "visual_input=flatten",
    }
    assert set(table["rows"]) == expected
    assert json.loads((out / "ablation.json").read_text())["rows"] == json.loads(json.dumps(table["rows"]))
    markdown = (out / "ablation.md").read_text()
    assert all(f"| {name} |" in markdown for name in expected)
    for row in table["rows"].values():
        assert (
            0 <= row["vqa_accuracy"] <= 1
            and 0 <= row["t2i_all_correct"] <= 1
            and row["psnr"] > 0
            and row["wall_seconds"] > 0
        )
        assert row["t2i_loss"] == row["stage2_sft_loss_after"]["text_to_image"] > 0  # the SFT's held-out measurement
    # Each variant's row is its own run folder's report, not a copy of the baseline's.
    for name, row in table["rows"].items():
        report = json.loads((out / name / "report.json").read_text())
        assert row["psnr"] == report["metrics"]["reconstruction"]["psnr"]
    assert table["claims"]["HQ >= RQ >= VQ (VQA)"] is None  # quantizer not run
    assert isinstance(table["claims"]["iterative > frozen > dual (VQA)"], bool)


def test_variants_change_only_their_factor(ablation):
    out, _ = ablation
    report = lambda name: json.loads((out / name / "report.json").read_text())  # noqa: E731
    assert report("paradigm=dual")["settings"]["paradigm"] == "dual"
    assert (
        not report("paradigm=frozen")["reused"]["stage1_tokenizer"]
        and report("paradigm=frozen")["reused"]["stage0_text_lm"]
    )
    assert report("decompression=off")["reused"]["stage1_tokenizer"]
    assert "stage2_decompress" not in report("decompression=off")["wall_seconds"]
    assert not (out / "decompression=off" / "stage2" / "decompress").exists()
    config = json.loads((out / "visual_input=flatten" / "mllm" / "config.json").read_text())
    assert config["visual_input"] == "flatten"
    # Baseline equals stage-I weights with the shared variants: their reconstruction is the same.
    base = report("baseline")["metrics"]["reconstruction"]["psnr"]
    assert report("visual_input=flatten")["metrics"]["reconstruction"]["psnr"] == pytest.approx(base)


def test_separate_codebook_uses_new_vocabulary_rows(ablation):
    out, _ = ablation
    separate = json.loads((out / "codebook=separate" / "mllm" / "config.json").read_text())
    unified = json.loads((out / "baseline" / "mllm" / "config.json").read_text())
    ids_sep, ids_uni = separate["vq_config"]["codebook_token_ids"], unified["vq_config"]["codebook_token_ids"]
    assert len(ids_sep) == len(ids_uni) == 128
    assert min(ids_sep) >= 600 and not set(ids_sep) & set(ids_uni)  # beyond the text vocabulary
    assert separate["text_config"]["vocab_size"] >= unified["text_config"]["vocab_size"] + 128


def test_claims_and_factor_errors():
    rows = {
        name: {"vqa_accuracy": v, "t2i_all_correct": v}
        for name, v in (("baseline", 0.6), ("paradigm=frozen", 0.5), ("paradigm=dual", 0.55))
    }
    assert claims(rows)["iterative > frozen > dual (VQA)"] is False
    assert claims(rows)["decompression pre-training helps generation"] is None
    tie = {**rows, "decompression=off": {"vqa_accuracy": 0.6, "t2i_all_correct": 0.6}}
    assert claims(tie)["decompression pre-training helps generation"] is False  # equal scores show no help
    # Held-out losses: lower is better, and the generation claims can be read where all-correct ties at 0.
    losses = {
        "baseline": {"t2i_loss": 3.1},
        "decompression=off": {"t2i_loss": 3.05},
        "codebook=separate": {"t2i_loss": 3.7},
    }
    assert claims(losses)["decompression pre-training helps generation (held-out text-to-image loss)"] is False
    assert claims(losses)["unified >= separate (held-out text-to-image loss)"] is True
    losses["decompression=off"]["t2i_loss"] = 3.2
    assert claims(losses)["decompression pre-training helps generation (held-out text-to-image loss)"] is True
    with pytest.raises(ValueError, match="not ablation factors"):
        run_ablation("unused", factors=["lr"])
    assert set(FACTORS) == {"paradigm", "quantizer", "decompression", "codebook", "visual_input"}
