"""Stage II on a run folder: decompression pre-training, then instruction tuning (TRL + LoRA).

    <run>/vision_tokenizer/, <run>/text_lm/ (or <run>/llm/ after dual)  <- stage 0 / I
    <run>/codes/{train,validation}/          the Shapes images, tokenized once (cached)
    <run>/stage2/base/                       the assembled MLLM (LoRA base of `decompress`)
    <run>/stage2/decompress/{trainer,adapter,model,metrics.json}
    <run>/stage2/sft/{trainer,adapter,metrics.json}
    <run>/mllm/                              the final merged MLLM + processor (HF folder)

`sft` starts from `stage2/decompress/model` when it exists (the paper's order), else from the base;
`StageIIArguments.from_decompressed` makes the choice explicit (the demo sets it from its budget).
Each stage's adapter is saved alone in PEFT format; the merged model is what later stages load.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import datasets
import torch
from accelerate import PartialState
from transformers import AutoProcessor
from trl.kernels.chunked_logprob import _use_triton

from hub_upload.run_folder import (
    ADAPTER_DIR,
    CODES_DIR,
    LLM_DIR,
    MLLM_DIR,
    STAGE2_DIR,
    TEXT_LM_DIR,
    VISION_TOKENIZER_DIR,
)
from modeling_unicode import (
    UniCodeForConditionalGeneration,
    UniCodeImageProcessor,
    UniCodeProcessor,
    UniCodeVisualTokenizer,
    check_adapter_size,
)

from .checkpointing import atomic_directory, atomic_write_json, is_complete, naming_corrupt_files, naming_full_disk
from .codes import cached_code_dataset, code_signature
from .data.shapes import build_split, scene_from_json
from .presets import load_preset, load_recipe, preset_visual_input, recipe_settings
from .rehearsal import rehearsal_dataset, rehearsal_share, with_reference_columns
from .run_guard import RUN_SETTINGS_FILE, check_resume_settings, read_settings
from .sft import (
    CODE_LOGITS,
    OUTPUT_HEADS,
    POSITION_INITS,
    CodesCollator,
    CompleteCheckpointCallback,
    WallClockBudget,
    _sft_trainer_class,
    add_labelled_positions_lm_head,
    draw_position_tables,
    last_complete_checkpoint,
    load_unicode_model,
    merge_adapter,
    prepare_full_finetune,
    redraw_text_rows,
    reinitialize_decoder_layers,
    remove_partial_checkpoints,
    save_mllm,
    sft_uses_bf16,
    task_losses,
    unicode_lora_config,
    unicode_sft_config,
    untie_output_head,
    word_row_ids,
)
from .tasks import (
    TASKS_SFT,
    check_vqa_layout,
    decompression_tasks,
    generation_tasks,
    split_by_task,
    tokenize_tasks,
    understanding_tasks,
)
from .text_lm import load_text_lm, pretrained_text_lm

STAGES = ("decompress", "sft")


@dataclass
class StageIIArguments:
    run_dir: str
    stage: str = "sft"
    preset: str = "tiny"
    llm: Optional[str] = None
    max_steps: int = 200
    batch_size: int = 8
    learning_rate: float = 2e-4
    lora: bool = True  # False: full fine-tuning of the LLM decoder (a small LLM trained from scratch)
    # Full fine-tuning only: True, the embedding rows that are not visual codes train too; a list of words, only those
    # words' rows (e.g. the colour and shape words a question names an object with).
    train_text_embeddings: bool | list[str] = False
    reinit_decoder: bool = (
        False  # full fine-tuning only: re-draw the LLM's decoder layers before the first stage-II training
    )
    # "trained": an untied LM head that learns to write codes (sft.untie_output_head); "trained_code_rows": untied,
    # but only its code rows train, its text rows stay the input rows' copies. Full fine-tuning only.
    output_head: str = "tied"
    image_positions: bool = False  # a learned embedding per input-image placeholder (config.image_position_embeddings)
    code_positions: bool = (
        False  # a learned embedding per index of a written image's codes (config.code_position_embeddings)
    )
    axial_positions: bool = False  # both tables as grid row + column + level (config.position_embedding_layout)
    # With reinit_decoder: the position tables stage II adds drawn at the LLM's initialisation ("normal") instead of at
    # zero ("zero"), so that where a cell is rides in its values from the first step (sft.draw_position_tables).
    position_init: str = "zero"
    image_input_adapter_size: int = 0  # > 0: a residual MLP of that width over the input image's features
    # With reinit_decoder: every embedding row that is not a visual code re-drawn too (sft.redraw_text_rows); the fresh
    # layers learn the question-to-context comparison from such rows, not from stage 0's.
    redraw_text_rows: bool = False
    decoder_layers: Optional[int] = None  # with reinit_decoder: how many fresh layers (default: the LLM's own count)
    decoder_intermediate_size: Optional[int] = None  # with reinit_decoder: the fresh layers' MLP width
    decoder_heads: Optional[int] = None  # with reinit_decoder: the fresh layers' attention heads (divide the width)
    loss_normalization: str = "token"  # "row": each row's loss is its own mean (sft.LOSS_NORMALIZATIONS)
    # Each training batch as two length-sorted micro-batches, each padded to its own longest row (sft.split_by_length):
    # the same step, computed on fewer padded tokens.
    length_split: bool = False
    code_logits: str = "vocabulary"  # "code_rows": a written image's codes scored over the code rows (sft.CODE_LOGITS)
    max_seconds: Optional[float] = (
        None  # a wall-clock budget instead of max_steps (sft.WallClockBudget); for benchmarks
    )
    # LoRA: the <image>, <boi>, <eoi> rows train too (PEFT trainable tokens). With a tied 262k-row table PEFT rebuilds
    # the whole table in every forward, for the embedding and the head alike.
    train_image_tokens: bool = True
    lora_r: int = 16
    lora_alpha: Optional[int] = None
    lora_dropout: float = 0.05
    target_modules: Optional[list[str]] = None
    segments: int = 4
    caption_drop: float = 0.1
    questions_per_image: int = 2
    questions_per_conversation: int = 1
    captions_per_image: int = 1  # caption rows per scene, each another of the scene's captions while they last
    drawings_per_image: int = 1  # text-to-image rows per scene, each from another of its captions while they last
    # Odds of drawing a question of each type for the VQA rows (1 for a type not named; None: uniform): more of the
    # questions a model answers worst (training.tasks.understanding_tasks).
    question_type_weights: Optional[dict[str, float]] = None
    # More yes/no questions per VQA image ({"existence": n, "relation": m}; Shapes world rows): they answer only by
    # comparing the question with the image (training.tasks.understanding_tasks).
    yes_no_questions_per_image: Optional[dict[str, int]] = None
    # The positions of this many distinct shapes per VQA image, asked after the yes/no ones (Shapes world rows): the
    # lookup of a named shape that relation and the other questions by name build on (training.tasks).
    position_questions_per_image: int = 0
    # Where each VQA conversation's first question stands: "image_first", "question_first" or "describe_first"
    # (processing_unicode.VQA_LAYOUTS); recorded in the saved processor, which evaluation asks in.
    vqa_layout: str = "image_first"
    # Each VQA conversation ends with a caption turn (training.tasks.understanding_tasks).
    caption_closes_vqa: bool = False
    # Question types whose answers are written with their reasoning first ("square and triangle: no"), Shapes world
    # rows (training.tasks.understanding_tasks, shapes.REASONED_TYPES); None: every answer is the bare word.
    reasoned_answers: Optional[list[str]] = None
    # A reasoned existence answer names each shape of the named colour with its cell ("square top left: no"): the
    # step a position answer needs, trained by every existence question (shapes.reasoned_answer).
    reasoned_cells: bool = False
    # The weight of a loss term that teaches one head of the last layer to look at the shapes a question names (Shapes
    # world rows; training.grounding): 0 trains from the answers alone.
    grounded_attention: float = 0.0
    # Which head each named shape's grounding trains (training.grounding.GROUNDING_HEADS): "assigned", head 0 (and
    # head 1 for a relation's second shape); "any", whichever of the layer's heads looks at it most.
    grounding_heads: str = "assigned"
    # A curriculum (Shapes world rows): the first `curriculum_steps` SFT steps train on rows of their own, the rest on
    # the usual rows. `curriculum_rows` (stage2.CURRICULA) says which: "one_shape", every task of the one-shape scenes;
    # "yes_no", VQA conversations of yes/no questions only.
    curriculum_steps: int = 0
    curriculum_rows: str = "one_shape"
    tasks: Optional[list[str]] = None  # the SFT tasks trained (default: all of training.tasks.TASKS_SFT)
    # Text-to-image rows draw other scenes, rendered with every shape centred in its cell. A caption names the cell,
    # not the place in it, so the jitter of the understanding rows' scenes is noise no caption can predict: it
    # spreads a shape's codes over many neighbours (docs/results.md, "Centred drawings").
    centred_drawings: bool = False
    # Self-rehearsal (training.rehearsal): this share of the SFT rows is text the LLM sampled itself before SFT, each
    # row at most `rehearsal_tokens` long, so that a pretrained LLM keeps its language. 0: none.
    rehearsal_fraction: float = 0.0
    rehearsal_tokens: int = 64
    rehearsal_samples: int = 320  # distinct rows sampled at most (repeated to the share): sampling time
    # > 0: each rehearsal token is scored against the LLM's top-k distribution there before SFT rather than the
    # drawn token alone (training.rehearsal): repeated rows cannot be memorised. 0: the drawn tokens.
    rehearsal_top_k: int = 0
    train_images: int = 2000
    eval_images: int = 64
    eval_rows_per_task: int = 64
    save_steps: int = 50
    logging_steps: int = 10
    warmup_ratio: float = 0.03
    seed: int = 0
    resume: bool = False
    from_decompressed: Optional[bool] = None  # sft's start: see `stage_paths` (None: decompression model if complete)
    use_cpu: Optional[bool] = None
    extra: dict = field(default_factory=dict)  # more SFTConfig fields

    # Settings that only a fully fine-tuned LLM can take: with LoRA the decoder layers and the head are frozen.
    FULL_FINETUNE_ONLY = (
        "reinit_decoder",
        "output_head",
        "decoder_layers",
        "decoder_intermediate_size",
        "decoder_heads",
        "train_text_embeddings",
        "redraw_text_rows",
        "position_init",
        "grounded_attention",
        "grounding_heads",
    )

    @classmethod
    def from_recipe(
        cls, run_dir: str | os.PathLike, stage: str = "sft", preset: str = "tiny", **overrides
    ) -> "StageIIArguments":
        """The arguments of one stage-II stage from the preset's recipe (`configuration/recipes/<preset>.yaml`,
        section `stage2` and its `<stage>` subsection), then `overrides` (None values are ignored). The one place
        where recipe keys become arguments: the CLI, the demo and the ablation all build their stage II here.

        With LoRA (from the recipe or an override) the recipe's full-fine-tuning settings are dropped unless
        overridden, so `--lora` on a full-fine-tuning recipe keeps the LLM's own layers and tied head."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} is not one of {list(STAGES)}")
        recipe = load_recipe(preset).get("stage2") or {}
        section = recipe.get(stage) or {}
        settings, overrides = recipe_settings(cls, [recipe, section], overrides)
        settings.setdefault("extra", {**(recipe.get("trainer") or {}), **(section.get("trainer") or {})})
        if settings.get("lora", True):
            for name in cls.FULL_FINETUNE_ONLY:
                if name not in overrides:
                    settings.pop(name, None)
        return cls(run_dir=str(run_dir), stage=stage, preset=preset, **settings)


def stage_paths(run_dir: str | os.PathLike, stage: str, from_decompressed: Optional[bool] = None) -> dict[str, Path]:
    """Folders of one stage-II stage. `from_decompressed` (sft): None starts from the decompression
    model when it is complete, else the base; False always from the base (decompression turned off,
    whatever an earlier run left); True requires the decompression model."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a stage-II stage; use one of {list(STAGES)}")
    run = Path(run_dir)
    root = run / STAGE2_DIR / stage
    decompressed = run / STAGE2_DIR / "decompress" / "model"
    assembled = run / STAGE2_DIR / "base"  # the stage-0 LLM + stage-I tokenizer, before any stage-II training
    if stage == "sft" and from_decompressed and not is_complete(decompressed):
        raise ValueError(
            f"from_decompressed=True but {decompressed} is not a complete model; run the decompress stage first"
        )
    use_decompressed = is_complete(decompressed) if from_decompressed is None else bool(from_decompressed)
    base = decompressed if stage == "sft" and use_decompressed else assembled
    merged = run / MLLM_DIR if stage == "sft" else decompressed
    return {
        "root": root,
        "trainer": root / "trainer",
        "adapter": root / ADAPTER_DIR,
        "base": base,
        "merged": merged,
        "assembled": assembled,
    }


def stage_complete(run_dir: str | os.PathLike, stage: str, lora: bool = True) -> bool:
    """A stage is done when its merged model is complete, and with LoRA its adapter too."""
    paths = stage_paths(run_dir, stage)
    return is_complete(paths["merged"]) and (not lora or is_complete(paths["adapter"]))


def _llm_source(run: Path, preset: str, llm: Optional[str]) -> str:
    if llm:
        return pretrained_text_lm({}, run / TEXT_LM_DIR, llm)
    if is_complete(run / LLM_DIR) or (run / LLM_DIR / "config.json").is_file():
        return str(run / LLM_DIR)  # dual: the LLM whose rows stage I wrote the codebook into
    text_model = load_preset(preset)["text_model"]
    if text_model.get("source") != "stage0":
        return pretrained_text_lm(text_model, run / TEXT_LM_DIR)
    if not (run / TEXT_LM_DIR / "config.json").is_file():
        raise ValueError(
            f"no LLM for the run: {run / 'text_lm'} is missing; run `unicode-mllm train-text` or pass llm="
        )
    return str(run / TEXT_LM_DIR)


def assemble_base(
    run_dir: str | os.PathLike, preset: str = "tiny", llm: Optional[str] = None, visual_input: Optional[str] = None
) -> Path:
    """Assemble the MLLM from stage 0/I outputs into `<run>/stage2/base` (once; atomic).
    `visual_input`: "aggregate" (the paper's compressed image input) or "flatten" (all ĥŵD codes); default: the
    model preset's (`presets.preset_visual_input`)."""
    run = Path(run_dir)
    out = stage_paths(run, "decompress")["assembled"]
    if is_complete(out):
        return out
    if not (run / VISION_TOKENIZER_DIR / "config.json").is_file():
        raise ValueError(
            f"no visual tokenizer at {run / 'vision_tokenizer'}; run `unicode-mllm train-tokenizer` first"
        )
    vision = UniCodeVisualTokenizer.from_pretrained(run / VISION_TOKENIZER_DIR).eval()
    model_llm, tokenizer = load_text_lm(_llm_source(run, preset, llm))
    model = UniCodeForConditionalGeneration.from_pretrained_parts(
        model_llm, tokenizer, vision, visual_input=visual_input or preset_visual_input(preset)
    )
    processor = UniCodeProcessor.from_model_config(
        model.config, tokenizer, UniCodeImageProcessor(size=vision.config.image_size)
    )
    return save_mllm(model, processor, out)


def load_model_and_processor(path: str | os.PathLike):
    model = load_unicode_model(path)
    with naming_corrupt_files(path):
        return model, AutoProcessor.from_pretrained(str(path))


def shapes_code_datasets(run_dir, encoder, train_images: int, eval_images: int, seed: int = 0, jitter: bool = True):
    """(train, validation) code datasets of the Shapes world at the tokenizer's resolution, cached
    in `<run>/codes/`. `jitter=False`: every shape centred in its cell (`centred_drawings`)."""
    size = code_signature(encoder)["image_size"]
    codes = Path(run_dir) / CODES_DIR
    suffix = "" if jitter else "-centred"
    train = cached_code_dataset(
        codes / f"train-{train_images}-s{seed}{suffix}",
        lambda: build_split("train", train_images, size, seed, jitter=jitter),
        encoder,
    )
    validation = cached_code_dataset(
        codes / f"validation-{eval_images}-s{seed}{suffix}",
        lambda: build_split("validation", eval_images, size, seed, jitter=jitter),
        encoder,
    )
    return train, validation


def stage_tasks(
    codes,
    stage: str,
    depth: int,
    segments: int = 4,
    caption_drop: float = 0.1,
    questions_per_image: int = 2,
    questions_per_conversation: int = 1,
    tasks: Optional[list[str]] = None,
    seed: int = 0,
    drawing_codes=None,
    captions_per_image: int = 1,
    drawings_per_image: int = 1,
    question_type_weights: Optional[dict[str, float]] = None,
    yes_no_questions_per_image: Optional[dict[str, int]] = None,
    vqa_layout: str = "image_first",
    caption_closes_vqa: bool = False,
    reasoned_answers: Optional[list[str]] = None,
    position_questions_per_image: int = 0,
    reasoned_cells: bool = False,
    grounded_answers: bool = False,
):
    """Task rows of a stage: `decompress` only decompression; `sft` understanding + generation
    (`tasks`: a subset of `TASKS_SFT`, default all). `drawing_codes`: the scenes the generation rows
    draw, when they are not `codes` (`centred_drawings`)."""
    if stage == "decompress":
        return decompression_tasks(codes, depth, segments, seed=seed)
    if stage != "sft":
        raise ValueError(f"stage={stage!r} is not a stage-II stage; use one of {list(STAGES)}")
    tasks = set(tasks or TASKS_SFT)
    unknown = sorted(tasks - set(TASKS_SFT))
    if unknown:
        raise ValueError(f"tasks {unknown} are not SFT tasks; choose from {list(TASKS_SFT)}")
    parts = []  # only the builders some requested task comes from; each builder yields two tasks
    if tasks & {"caption", "vqa"}:
        parts.append(
            understanding_tasks(
                codes,
                seed=seed,
                questions_per_image=questions_per_image,
                questions_per_conversation=questions_per_conversation,
                captions_per_image=captions_per_image,
                question_type_weights=question_type_weights,
                yes_no_questions_per_image=yes_no_questions_per_image,
                vqa_layout=vqa_layout,
                caption_closes_vqa=caption_closes_vqa,
                reasoned_answers=reasoned_answers,
                position_questions_per_image=position_questions_per_image,
                reasoned_cells=reasoned_cells,
                grounded_answers=grounded_answers,
            )
        )
    if tasks & {"text_to_image", "continue_image"}:
        drawn = codes if drawing_codes is None else drawing_codes
        parts.append(
            generation_tasks(
                drawn, depth, segments, caption_drop=caption_drop, seed=seed, drawings_per_image=drawings_per_image
            )
        )
    rows = datasets.concatenate_datasets(parts)
    return rows if tasks == set(TASKS_SFT) else rows.filter(lambda task: task in tasks, input_columns="task")


CURRICULA = ("one_shape", "yes_no")


def curriculum_tasks(kind: str, codes, drawing_codes, seed: int, common: dict):
    """The task rows a curriculum's first steps train on (`StageIIArguments.curriculum_rows`), drawn with their own
    `seed` from the training scenes `codes` (and their `drawing_codes`, when drawings are of other renderings).

    - "one_shape": every task of the scenes that hold one shape. A lone shape needs no search for the object a
      question names, so reading can be learnt before binding.
    - "yes_no": one VQA conversation per scene of 8 existence and 4 relation questions, nothing else. A yes/no
      answer comes only from comparing the question with the image, which gives no gradient until it is partly
      learnt (docs/results.md, "What the LLM reads"); these rows put about a hundred such answers in every step."""
    if kind not in CURRICULA:
        raise ValueError(f"curriculum_rows={kind!r} is not one of {list(CURRICULA)}")
    if "scene" not in codes.column_names:
        raise ValueError("a curriculum picks its rows by scene: the training codes need the Shapes world's `scene`")
    if kind == "yes_no":
        asked = {"existence": 8, "relation": 4}
        only_yes_no = {
            **common,
            "questions_per_image": 0,
            "captions_per_image": 0,
            "questions_per_conversation": sum(asked.values()),
            "yes_no_questions_per_image": asked,
            "tasks": ["vqa"],
        }
        return stage_tasks(codes, "sft", seed=seed, **only_yes_no)
    one_shape = [i for i, scene in enumerate(codes["scene"]) if len(scene_from_json(scene)["objects"]) == 1]
    if not one_shape:
        raise ValueError(
            f"curriculum_rows='one_shape': none of the {len(codes)} training scenes holds one shape; raise "
            "train_images or choose another curriculum"
        )
    drawn = None if drawing_codes is None else drawing_codes.select(one_shape)
    return stage_tasks(codes.select(one_shape), "sft", seed=seed, drawing_codes=drawn, **common)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_sft(
    model,
    processor,
    train_dataset,
    output_dir: str | os.PathLike,
    eval_by_task: Optional[dict] = None,
    lora: Optional[dict] | bool = None,
    resume: bool = False,
    eval_rows_per_task: Optional[int] = 64,
    train_text_embeddings: bool | Sequence[str] = False,
    output_head: str = "tied",
    loss_normalization: str = "token",
    max_seconds: Optional[float] = None,
    settings: Optional[dict] = None,
    may_differ: tuple[str, ...] = (),
    code_logits: str = "vocabulary",
    first_rows=None,
    first_steps: int = 0,
    length_split: bool = False,
    grounded_attention: float = 0.0,
    grounding_heads: str = "assigned",
    **sft_overrides,
):
    """SFTTrainer on tokenized task rows: LoRA (`lora` = its keyword arguments, None = defaults) or,
    with `lora=False`, full fine-tuning of the LLM decoder (`sft.prepare_full_finetune`). Returns
    (trainer, {"before", "after", ...}). `output_head="trained"` unties the LM head and trains it (full fine-tuning);
    `loss_normalization` and `max_seconds` are `UniCodeSFTTrainer`'s options; `code_logits` is
    `sft.add_labelled_positions_lm_head`'s; `length_split` runs each training batch as two length-sorted micro-batches
    (`sft.split_by_length`); `first_rows` (indices of `train_dataset`) and `first_steps` a curriculum:
    the first steps train on those rows only, the later ones on the others (`sft.FirstRowsSampler`). `settings` (the
    caller's arguments) are recorded in `output_dir`, and a resume with other ones, `may_differ` aside, is refused.

    Shared by the run-folder stages and a user's fine-tune (`training.finetune`)."""

    for name in ("input_ids", "labels", "image_codes"):
        if name not in train_dataset.column_names:
            raise ValueError(
                f"train_dataset has no {name!r} column (columns: {train_dataset.column_names}); build task rows and "
                "tokenize them with training.tasks.tokenize_tasks"
            )
    # Settings that do not fit are refused before anything is written or scored.
    if output_head not in OUTPUT_HEADS:
        raise ValueError(f"output_head={output_head!r} is not one of {list(OUTPUT_HEADS)}")
    if output_head != "tied" and lora is not False:
        raise ValueError(
            f"output_head={output_head!r} needs full fine-tuning (lora=False); with LoRA the LM head stays the "
            "frozen, tied codebook (output_head='tied')"
        )
    if train_text_embeddings and lora is not False:
        raise ValueError(
            "train_text_embeddings=True needs full fine-tuning (lora=False); LoRA keeps the embedding frozen"
        )
    if train_text_embeddings and output_head == "trained_code_rows":
        raise ValueError(
            "output_head='trained_code_rows' keeps the head's text rows equal to the input rows, which "
            "train_text_embeddings=True would move; use output_head='trained' with it"
        )
    if code_logits not in CODE_LOGITS:
        raise ValueError(f"code_logits={code_logits!r} is not one of {list(CODE_LOGITS)}")
    text_rows = (
        train_text_embeddings
        if isinstance(train_text_embeddings, bool)
        else word_row_ids(processor.tokenizer, train_text_embeddings)
    )
    wall_clock = WallClockBudget(max_seconds) if max_seconds is not None else None
    if wall_clock is not None:
        sft_overrides = {**sft_overrides, "max_steps": 10**9, "warmup_steps": 0}  # the clock ends the run
    collator = CodesCollator(processor.tokenizer.pad_token_id)
    peft_config = None if lora is False else unicode_lora_config(model, **(lora or {}))
    args = unicode_sft_config(output_dir, **sft_overrides)
    checkpoint = None
    if resume:
        if _main_process():
            remove_partial_checkpoints(output_dir)
        checkpoint = last_complete_checkpoint(output_dir)
    record = Path(output_dir) / RUN_SETTINGS_FILE
    if checkpoint is not None and settings is not None:
        check_resume_settings(read_settings(record), settings, checkpoint, may_differ)
    elif settings is not None and _main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, settings)
    scoring = {"max_rows": eval_rows_per_task, "code_logits": code_logits}
    before = task_losses(model, eval_by_task, collator, **scoring) if eval_by_task else {}
    if peft_config is None:
        if output_head != "tied":
            untie_output_head(model)
        prepare_full_finetune(
            model,
            text_rows=text_rows,
            head_text_rows=output_head != "trained_code_rows",
        )
    else:
        model.requires_grad_(False)  # embeddings, LM head, visual tokenizer: PEFT adds what trains
    trainer = _sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[CompleteCheckpointCallback()],
        loss_normalization=loss_normalization,
        wall_clock=wall_clock,
        first_rows=first_rows,
        first_steps=first_steps,
        length_split=length_split,
        grounded_attention=grounded_attention,
        grounding_heads=grounding_heads,
    )
    _expose_lm_head_bias(trainer.model)
    if code_logits != "vocabulary" or not _trl_compact_lm_head(trainer.args.device):
        add_labelled_positions_lm_head(
            trainer.model.get_base_model() if peft_config is not None else trainer.model, code_logits
        )
    started = time.perf_counter()
    with naming_full_disk(output_dir):  # the Trainer's own checkpoint writes
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    after = task_losses(trainer.model, eval_by_task, collator, **scoring) if eval_by_task else {}
    metrics = {
        "before": before,
        "after": after,
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "train_seconds": seconds,
        "train_tokens": int(getattr(trainer, "_total_train_tokens", 0)),  # attended tokens, padding excluded
        "world_size": trainer.accelerator.num_processes,
    }
    return trainer, metrics


def _trl_compact_lm_head(device) -> bool:
    """TRL's fused LM head projects only labelled positions where its Triton kernels run (CUDA/XPU);
    elsewhere it scores every position, and `add_labelled_positions_lm_head` replaces it."""
    return _use_triton(torch.device(device))


def _expose_lm_head_bias(model) -> None:
    """With tied embeddings PEFT wraps the LM head in a `TrainableTokensWrapper` (so the special-token
    rows train on both sides); it forwards `.weight` (merged with the trained rows) but not `.bias`,
    which TRL's fused LM head reads. Our LM head has no bias: say so on the wrapper."""
    head = model.get_output_embeddings()
    if head is not None and "bias" not in dir(type(head)) and not _has_attribute(head, "bias"):
        original = getattr(head, "original_module", None)
        object.__setattr__(head, "bias", getattr(original, "bias", None))


def _has_attribute(module, name: str) -> bool:
    try:
        getattr(module, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def save_adapter(trainer, folder: str | os.PathLike) -> Path:
    """The LoRA adapter alone, PEFT format (`PeftModel.from_pretrained(base, folder)`), atomically."""
    if trainer.accelerator.is_main_process:
        with atomic_directory(folder) as staging:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()
    return Path(folder)


# What a resumed stage-II run may change: how long it trains, how often it logs and saves, and what it evaluates.
RESUMABLE_CHANGES = (
    "max_steps",
    "length_split",
    "max_seconds",
    "save_steps",
    "logging_steps",
    "eval_images",
    "eval_rows_per_task",
    "resume",
    "use_cpu",
    "run_dir",
)


def _use_axial_positions(model) -> None:
    """`axial_positions`: the position tables added in this stage address a cell by grid row, column and level."""
    tables = ("image_position_embedding", "code_position_embedding")
    existing = [t for t in tables if getattr(model.model, t) is not None]
    if existing and model.config.position_embedding_layout != "axial":
        raise ValueError(
            f"axial_positions=True, but the model already has {existing} in the "
            f"{model.config.position_embedding_layout!r} layout; train from a base without position tables, or drop "
            "axial_positions"
        )
    model.config.position_embedding_layout = "axial"


def train_stage2(args: StageIIArguments) -> dict:
    """One stage-II stage on a run folder: codes (cached), tasks, LoRA SFT, adapter, merged model."""
    if args.curriculum_rows not in CURRICULA:
        raise ValueError(f"curriculum_rows={args.curriculum_rows!r} is not one of {list(CURRICULA)}")
    if (
        isinstance(args.curriculum_steps, bool)
        or not isinstance(args.curriculum_steps, int)
        or args.curriculum_steps < 0
    ):
        raise ValueError(f"curriculum_steps={args.curriculum_steps!r} must be a whole number of steps >= 0 (0: none)")
    check_vqa_layout(args.vqa_layout)
    check_adapter_size(args.image_input_adapter_size)
    for name in ("decoder_layers", "decoder_intermediate_size", "decoder_heads"):
        if getattr(args, name) is not None and not args.reinit_decoder:
            raise ValueError(f"{name} needs reinit_decoder=True: only freshly drawn layers can change their shape")
    if args.position_init not in POSITION_INITS:
        raise ValueError(f"position_init={args.position_init!r} is not one of {list(POSITION_INITS)}")
    if args.position_init != "zero" and not args.reinit_decoder:
        raise ValueError(
            f"position_init={args.position_init!r} needs reinit_decoder=True: an LLM's own layers expect the tables "
            "stage II adds to start at zero, where the model computes what it did before"
        )
    if args.redraw_text_rows and not args.reinit_decoder:
        raise ValueError(
            "redraw_text_rows=True needs reinit_decoder=True: an LLM's own layers read the text rows they were "
            "trained with"
        )
    if args.reinit_decoder and args.lora:
        raise ValueError(
            "reinit_decoder=True needs full fine-tuning (lora=False): LoRA cannot train freshly drawn layers"
        )
    paths = stage_paths(args.run_dir, args.stage)
    if args.resume and stage_complete(args.run_dir, args.stage, args.lora):
        print(f"stage II {args.stage} already finished: {paths['merged']} (delete it to train again)")
        return (
            json.loads((paths["root"] / "metrics.json").read_text())
            if (paths["root"] / "metrics.json").is_file()
            else {}
        )
    if _main_process():
        assemble_base(args.run_dir, args.preset, args.llm)
    _barrier()
    start = stage_paths(args.run_dir, args.stage, args.from_decompressed)
    base = start["base"]
    model, processor = load_model_and_processor(base)
    # Saved with the model, so that evaluation, the Space and users ask it as it was trained.
    processor.vqa_layout = args.vqa_layout
    if args.reinit_decoder and base == start["assembled"]:  # not again after decompression pre-training
        reinitialize_decoder_layers(
            model,
            seed=args.seed,
            num_layers=args.decoder_layers,
            intermediate_size=args.decoder_intermediate_size,
            num_heads=args.decoder_heads,
        )
        if args.redraw_text_rows:
            redraw_text_rows(model, seed=args.seed)
    if args.axial_positions:
        _use_axial_positions(model)
    if args.image_positions and model.model.image_position_embedding is None:
        model.model.add_image_position_embedding()
    if args.code_positions and model.model.code_position_embedding is None:
        model.model.add_code_position_embedding()
    if args.position_init == "normal" and base == start["assembled"]:
        draw_position_tables(model, seed=args.seed)
    if args.image_input_adapter_size and model.model.image_input_adapter is None:
        model.model.add_image_input_adapter(args.image_input_adapter_size)
    vq = model.config.vq_config
    max_length = model.config.get_text_config().max_position_embeddings
    # The jittered scenes, and the centred ones the drawing rows take instead (`centred_drawings`, SFT only).
    jitters = (True, False) if args.centred_drawings and args.stage == "sft" else (True,)

    def code_sets():
        return [
            shapes_code_datasets(args.run_dir, model, args.train_images, args.eval_images, args.seed, jitter=jitter)
            for jitter in jitters
        ]

    if _main_process():
        code_sets()  # encoded once, by one process; the others read the cache after the barrier
    _barrier()
    (train_codes, eval_codes), *drawn = code_sets()
    train_drawn, eval_drawn = drawn[0] if drawn else (None, None)
    common = {
        "depth": vq.depth,
        "segments": args.segments,
        "caption_drop": args.caption_drop,
        "questions_per_image": args.questions_per_image,
        "questions_per_conversation": args.questions_per_conversation,
        "captions_per_image": args.captions_per_image,
        "drawings_per_image": args.drawings_per_image,
        "question_type_weights": args.question_type_weights,
        "yes_no_questions_per_image": args.yes_no_questions_per_image,
        "vqa_layout": args.vqa_layout,
        "caption_closes_vqa": args.caption_closes_vqa,
        "reasoned_answers": args.reasoned_answers,
        "reasoned_cells": args.reasoned_cells,
        "position_questions_per_image": args.position_questions_per_image,
        "tasks": args.tasks,
    }
    # Grounded answers carry their cells (training.grounding); only the training rows keep them as columns.
    grounded = bool(args.grounded_attention) and args.stage == "sft"
    common["grounded_answers"] = grounded
    train_rows = tokenize_tasks(
        stage_tasks(train_codes, args.stage, seed=args.seed, drawing_codes=train_drawn, **common),
        processor,
        max_length,
        grounding=grounded,
    )
    eval_rows = tokenize_tasks(
        stage_tasks(eval_codes, args.stage, seed=args.seed + 1, drawing_codes=eval_drawn, **common),
        processor,
        max_length,
    )
    first_rows = None  # before the rehearsal rows, which then come after them and get the same columns
    if args.curriculum_steps and args.stage == "sft":
        first = tokenize_tasks(
            curriculum_tasks(args.curriculum_rows, train_codes, train_drawn, args.seed + 2, common),
            processor,
            max_length,
            grounding=grounded,
        )
        first_rows = range(len(train_rows), len(train_rows) + len(first))
        train_rows = datasets.concatenate_datasets([train_rows, first.cast(train_rows.features)])
    overrides = {
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "save_steps": args.save_steps,
        "logging_steps": args.logging_steps,
        "warmup_steps": int(args.warmup_ratio * args.max_steps),
        "seed": args.seed,
        **({"use_cpu": args.use_cpu} if args.use_cpu is not None else {}),
        **args.extra,
    }
    if args.rehearsal_fraction and args.stage == "sft":
        # Sampled from the model SFT starts from, before any adapter: its own language is what is kept. One
        # process samples and caches; the others read the cache after the barrier.
        share = rehearsal_share(
            args.rehearsal_fraction, len(train_rows), args.max_steps * args.batch_size, args.rehearsal_samples
        )

        def rehearsal():
            return rehearsal_dataset(
                args.run_dir,
                model,
                processor.tokenizer,
                share,
                args.rehearsal_tokens,
                args.seed,
                train_rows.features,
                top_k=args.rehearsal_top_k,
                bf16=sft_uses_bf16(overrides),
            )

        if _main_process():
            rehearsal()
        _barrier()
        task_rows = with_reference_columns(train_rows) if args.rehearsal_top_k else train_rows
        train_rows = datasets.concatenate_datasets([task_rows, rehearsal()])
    lora = args.lora and {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "dropout": args.lora_dropout,
        "target_modules": args.target_modules,
        "train_special_tokens": args.train_image_tokens,
    }
    trainer, metrics = run_sft(
        model,
        processor,
        train_rows,
        paths["trainer"],
        split_by_task(eval_rows),
        lora,
        args.resume,
        args.eval_rows_per_task,
        train_text_embeddings=args.train_text_embeddings,
        output_head=args.output_head,
        loss_normalization=args.loss_normalization,
        max_seconds=args.max_seconds,
        settings=asdict(args),
        may_differ=RESUMABLE_CHANGES,
        code_logits=args.code_logits,
        first_rows=first_rows,
        first_steps=args.curriculum_steps if first_rows is not None else 0,
        length_split=args.length_split,
        grounded_attention=args.grounded_attention,
        grounding_heads=args.grounding_heads,
        **overrides,
    )
    if args.lora:
        save_adapter(trainer, paths["adapter"])
    if trainer.accelerator.is_main_process:
        if args.lora:
            merge_adapter(paths["adapter"], paths["merged"], base=base, processor=processor)
        else:
            save_mllm(trainer.accelerator.unwrap_model(trainer.model), processor, paths["merged"])
        metrics = {
            **metrics,
            "stage": args.stage,
            "base": str(base),
            "adapter": str(paths["adapter"]) if args.lora else None,
            "merged": str(paths["merged"]),
            "arguments": asdict(args),
        }
        atomic_write_json(paths["root"] / "metrics.json", metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Before the Trainer creates the process group, other ranks wait for rank 0's files.
        PartialState().wait_for_everyone()


__all__ = [
    "STAGES",
    "StageIIArguments",
    "stage_paths",
    "stage_complete",
    "assemble_base",
    "load_model_and_processor",
    "shapes_code_datasets",
    "stage_tasks",
    "run_sft",
    "save_adapter",
    "train_stage2",
]
