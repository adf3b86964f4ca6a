"""A tiny stage-I run folder (text_lm/ + vision_tokenizer/ at 32 px, 4x4x2 codes) for stage-II tests,
and small code datasets from the Shapes world for the in-process tiny MLLM (16 px)."""

from pathlib import Path

from stage1_fixtures import make_tiny_llm, tiny_images, tiny_overrides


def make_tiny_run(folder: Path) -> Path:
    """`folder` with `text_lm/` and a 2-step stage-I `vision_tokenizer/` (codebook = LLM rows)."""
    from training.stage1 import StageIArguments, StageITrainer

    if (folder / "vision_tokenizer" / "COMPLETE").is_file():
        return folder
    make_tiny_llm(folder / "text_lm")
    overrides = tiny_overrides(image_size=32, channel_multipliers=[1, 2, 2, 2])
    args = StageIArguments(
        output_dir=str(folder),
        llm_path=str(folder / "text_lm"),
        codebook_size=128,
        max_steps=2,
        batch_size=4,
        warmup_steps=1,
        log_every=1,
        sample_every=0,
        checkpoint_every=0,
        eval_images=4,
        vision_overrides=overrides,
    )
    images = tiny_images(8, size=32)
    StageITrainer(args, images, images[:4]).train()
    return folder


def shapes_at(size: int, n: int, split: str = "train", seed: int = 0):
    """Shapes world rows with images resized to `size` px (the Shapes world renders >= 32 px)."""
    from training.data.shapes import build_split

    return build_split(split, n, image_size=32, seed=seed).map(lambda r: {"image": r["image"].resize((size, size))})
