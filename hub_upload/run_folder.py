"""The run folder (docs/design.md): what `hub_upload` needs from `outputs/<run>/`, checked up front.

Export reads only `mllm/` (the assembled model, processor and tokenizer), `report.json` (the measured
metrics and settings the model card quotes) and `samples.png` (the grid the card shows). Everything
is checked before any work starts, and every missing piece is named at once, so a half-written or
untrained folder is refused with one message instead of failing halfway through an export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

# The run folder's layout (docs/design.md, "The run folder"): the one place its names are spelled. The training
# stages that write a run and the export that reads it both import these.
TEXT_LM_DIR = "text_lm"  # stage 0
STAGE1_DIR = "stage1"  # stage I's checkpoints and metrics
VISION_TOKENIZER_DIR = "vision_tokenizer"  # stage I's tokenizer
LLM_DIR = "llm"  # stage I under `dual`: the LLM whose rows it rewrote
CODES_DIR = "codes"  # the images as code datasets
STAGE2_DIR = "stage2"  # stage II's stages
ADAPTER_DIR = "adapter"  # a PEFT LoRA adapter
MLLM_DIR = "mllm"  # the final MLLM with its processor
REPORT_FILE = "report.json"
REPORT_MARKDOWN_FILE = "report.md"
# What `unicode-mllm evaluate --output <folder>` writes: the report of a model trained elsewhere (a LoRA fine-tune
# merged with `finetune --merge`), put beside it as <folder>/mllm/ so that folder exports like a run.
EVALUATION_FILE = "evaluation.json"
SAMPLES_FILE = "samples.png"
QUESTION_FILE = "question.png"
GENERATED_FILE = "generated.png"
DEMO_STAGES_FILE = "demo_stages.json"  # the settings each finished demo stage ran with
ADAPTER_DIRS = (ADAPTER_DIR, f"{MLLM_DIR}/{ADAPTER_DIR}")  # where stage II may leave a PEFT LoRA adapter
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class RunFolder:
    """A checked run folder: its paths and the parsed `report.json`."""

    path: Path
    report: dict = field(repr=False)
    report_file: str = REPORT_FILE

    @property
    def mllm(self) -> Path:
        return self.path / MLLM_DIR

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def report_path(self) -> Path:
        return self.path / self.report_file

    def adapter(self) -> Path:
        """The folder holding the run's PEFT adapter (`adapter_config.json` + safetensors weights)."""
        for name in ADAPTER_DIRS:
            folder = self.path / name
            if (folder / "adapter_config.json").is_file():
                if not (folder / "adapter_model.safetensors").is_file():
                    raise ValueError(
                        f"{folder} has adapter_config.json but no adapter_model.safetensors; weights are exported as "
                        "safetensors only (save the adapter with PeftModel.save_pretrained(..., "
                        "safe_serialization=True))"
                    )
                return folder
        looked = ", ".join(str(self.path / name) for name in ADAPTER_DIRS)
        raise ValueError(
            f"no PEFT adapter in this run (looked for adapter_config.json in {looked}); drop the adapter option "
            "or train stage II with LoRA"
        )


def missing_mllm_parts(mllm: Path, shown_as: str = MLLM_DIR) -> list[str]:
    """What `mllm` lacks to be a loadable UniCode MLLM folder (model + processor), each part named as
    `shown_as/<file>`; [] when nothing is missing. Export checks a run's `mllm/` with it, `evaluate` any folder."""
    # Here, not at the top: the layout names above are read by the command line and by `push`, which must not load
    # transformers to answer.
    from modeling_unicode.configuration_unicode import UniCodeConfig

    if not mllm.is_dir():
        return [f"{shown_as}/ (the assembled MLLM; stage II writes it)"]
    missing = []
    config = mllm / "config.json"
    if not config.is_file():
        missing.append(f"{shown_as}/config.json")
    else:
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_type = None
            missing.append(f"{shown_as}/config.json that parses as a JSON object")
        if model_type is not None and model_type != UniCodeConfig.model_type:
            missing.append(
                f"{shown_as}/config.json with model_type {UniCodeConfig.model_type!r} (found {model_type!r}"
                + (
                    "; that is the visual tokenizer alone, which cannot answer questions: use the run's mllm/"
                    if model_type == "unicode_vq"
                    else ""
                )
                + ")"
            )
    if not any(mllm.glob("*.safetensors")):
        missing.append(f"{shown_as}/*.safetensors (the weights)")
    if not ((mllm / "tokenizer.json").is_file() or (mllm / "tokenizer_config.json").is_file()):
        missing.append(f"{shown_as}/tokenizer.json (save the processor with the model)")
    if not (mllm / "processor_config.json").is_file():
        missing.append(f"{shown_as}/processor_config.json (save the processor with the model)")
    return missing


def load_report(path: Union[str, os.PathLike]) -> dict:
    """Parse a run's `report.json`; it must be an object with a non-empty `metrics` object."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rewrite it from the run's evaluation") from None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict) or not report["metrics"]:
        raise ValueError(
            f"{path} has no 'metrics' object; the model card quotes measured metrics, so evaluate the run first"
        )
    return report


def check_run_folder(run_dir: Union[str, os.PathLike]) -> RunFolder:
    """Check that `run_dir` is a trained UniCode run folder and return it.

    Raises:
        ValueError: naming every missing or invalid piece, and what produces it.
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a path, got {type(run_dir).__name__}")
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run_dir {str(path)!r} is not a directory; pass a run folder such as outputs/tiny")
    missing = missing_mllm_parts(path / MLLM_DIR)
    report = None
    report_file = next((name for name in (REPORT_FILE, EVALUATION_FILE) if (path / name).is_file()), None)
    if report_file is None:
        missing.append(
            f"{REPORT_FILE} (metrics, settings, wall times, versions; for a model trained elsewhere, "
            f"`unicode-mllm evaluate --model {path / MLLM_DIR} --output {path}` writes {EVALUATION_FILE})"
        )
    else:
        try:
            report = load_report(path / report_file)
        except ValueError as error:
            missing.append(f"a valid {report_file}: {error}")
    samples = path / SAMPLES_FILE
    if not samples.is_file():
        missing.append(f"{SAMPLES_FILE} (the sample grid for the model card)")
    else:
        with open(samples, "rb") as handle:
            if handle.read(8) != PNG_SIGNATURE:
                missing.append(f"{SAMPLES_FILE} that is a PNG image")
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a trained UniCode run folder; missing: "
            + "; ".join(missing)
            + ". A run folder comes from training (stage II writes mllm/, report.json and samples.png; "
            "its layout is in the UniCode repository's docs/design.md)."
        )
    return RunFolder(path=path, report=report, report_file=report_file)


__all__ = [
    "RunFolder",
    "check_run_folder",
    "load_report",
    "missing_mllm_parts",
    "MLLM_DIR",
    "REPORT_FILE",
    "EVALUATION_FILE",
    "SAMPLES_FILE",
]
