"""Where a shape's information sits in an image's codes, and whether the caption decides the drawing.

    python scripts/code_locality.py <mllm folder> [<mllm folder> ...] [--scenes 64]

For single-shape test scenes drawn with the shape at its cell's centre (the text-to-image rows' scenes), against the
blank image's code map, it prints per model:
- the distinct codes of the blank image per level (one per level when blank patches always get the same codes);
- per level, the share of codes outside the shape's 2 x 2 block of code positions that differ from the blank
  image's: the shape's information spread into patches that show nothing of it;
- how often the first code that differs from the blank image's is the block's first code;
- at that first differing code, teacher-forced after the true codes before it, the nats of the true code under the
  true caption, the empty caption (CFG's unconditional prompt) and another scene's caption, and the probability of
  the blank image's code there. When the three captions give the same nats, the code is read off the codes before
  it, not the caption (docs/results.md, "A patch-local encoder").
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from per_model_report import run_over_models, single_shape_code_maps  # noqa: E402

from modeling_unicode.quantization_unicode import flatten_code_map  # noqa: E402
from training.data.shapes import GRID, caption_for_scene  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402


def first_code_nats(model, processor, captions, codes, blank) -> tuple[float, float]:
    """Mean nats of the first code that differs from `blank`, and the mean probability of `blank`'s code there."""
    nats, blank_probability = [], []
    boi = torch.tensor([[model.config.boi_token_id]])
    for caption, sequence in zip(captions, codes):
        prompt = processor(text=[caption], generation_mode="image")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, boi, sequence[None]], 1)).logits[0, prompt.shape[1] : -1]
        first = int((sequence != blank).nonzero()[0, 0])
        log_probs = torch.log_softmax(logits[first].float(), -1)
        nats.append(-float(log_probs[sequence[first]]))
        blank_probability.append(float(log_probs[blank[first]].exp()))
    return sum(nats) / len(nats), sum(blank_probability) / len(blank_probability)


def locality(path: str, num_scenes: int) -> dict:
    model, processor = load_model_and_processor(path)
    model.eval()
    scenes, maps, blank_map = single_shape_code_maps(model, 4242, num_scenes, jitter=False)
    cells = model.config.vq_config.code_grid_size // GRID  # code positions per side of a Shapes-world cell
    depth = maps.shape[-1]
    outside, outside_total, first_in_block = torch.zeros(depth), 0, 0
    for scene, code_map in zip(scenes, maps):
        row, col = scene["objects"][0]["row"], scene["objects"][0]["col"]
        block = torch.zeros(code_map.shape[:2], dtype=torch.bool)
        block[row * cells : (row + 1) * cells, col * cells : (col + 1) * cells] = True
        differs = code_map != blank_map
        outside += differs[~block].sum(0).float()  # per level
        outside_total += int((~block).sum())
        first = int(differs.reshape(-1).nonzero()[0, 0])
        first_in_block += first == (row * cells * code_map.shape[1] + col * cells) * code_map.shape[-1]
    codes, blank = flatten_code_map(maps), flatten_code_map(blank_map[None])[0]
    captions = [caption_for_scene(scene) for scene in scenes]
    result = {
        "blank_codes_per_level": [int(blank_map[..., d].unique().numel()) for d in range(blank_map.shape[-1])],
        "outside_block_differing_per_level": [round(float(v), 3) for v in outside / outside_total],
        "first_differing_code_is_the_blocks_first": first_in_block / num_scenes,
    }
    for name, prompts in (
        ("true caption", captions),
        ("empty caption", [""] * num_scenes),
        ("another scene's caption", captions[1:] + captions[:1]),
    ):
        result[name] = dict(zip(("nats", "p_blank_code"), first_code_nats(model, processor, prompts, codes, blank)))
    return result


if __name__ == "__main__":
    run_over_models(__doc__, locality, default_scenes=64)
