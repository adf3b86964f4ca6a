"""How much of a patch's colour a run's visual codes carry: the question behind the demo's VQA.

    python scripts/code_semantics.py --run outputs/demo-tiny [--images 600]

The run's visual tokenizer (`<run>/vision_tokenizer`, from `demo` or `train-tokenizer`) encodes
`--images` Shapes train scenes. For each code position, the label is the dominant Shapes colour of the
image patch under it (patches less than `--coverage` coloured are left
out). Per quantization level, a lookup table code id -> most frequent colour is fitted on 80 % of the
patches and scored on the rest (a code unseen in the fit counts as wrong). Chance is always answering
the most frequent colour. If the level-0 code of a patch that is all red does not say "red", an LM that
reads the codes has to decode colour from combinations of codes and their neighbours (README, "What the
codes carry": codes that say more did not, alone, make the demo's LM ground).

Prints one JSON line: per level, held-out accuracy, chance, distinct codes; patches, coverage.
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.scene_parser import patch_colours  # noqa: E402
from training.data.shapes import COLORS, render_scene  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder with vision_tokenizer/ (demo or train-tokenizer)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--coverage", type=float, default=0.6, help="least coloured fraction of a labelled patch")
    args = parser.parse_args()

    import torch

    from modeling_unicode import UniCodeVisualTokenizer
    from training.data.shapes import build_split
    from training.stage1 import images_to_uint8, to_pixel_values

    run = Path(args.run)
    if not (run / "vision_tokenizer" / "config.json").is_file():
        raise SystemExit(f"--run {run} has no vision_tokenizer/; run `unicode-mllm demo` or `train-tokenizer` first")
    tokenizer = UniCodeVisualTokenizer.from_pretrained(run / "vision_tokenizer").eval()
    config = tokenizer.config
    size, grid = config.image_size, config.code_grid_size
    scenes = build_split("train", args.images, image_size=size, seed=0)
    pixels = to_pixel_values(images_to_uint8(list(scenes["image"]), size, "Shapes scenes"))
    with torch.no_grad():
        code_maps = torch.cat([tokenizer.encode(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]).numpy()

    codes, labels = [], []
    for code_map, scene in zip(code_maps, scenes["scene"]):  # code_map: (grid, grid, depth)
        colour = patch_colours(render_scene(scene, size), grid, args.coverage)
        keep = colour >= 0
        codes.append(code_map[keep])
        labels.append(colour[keep])
    codes, labels = np.concatenate(codes), np.concatenate(labels)
    if len(labels) < 10:
        raise SystemExit(f"only {len(labels)} patches of {grid}x{grid} are at least {args.coverage:.0%} one colour; "
                         "lower --coverage (a coarse grid's patches are mostly background)")
    split = len(labels) * 8 // 10
    chance = float(np.mean(labels[split:] == np.bincount(labels[:split]).argmax()))
    levels = []
    for level in range(config.depth):
        table: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for code, label in zip(codes[:split, level], labels[:split]):
            table[int(code)][int(label)] += 1
        predicted = [table[int(c)].most_common(1)[0][0] if int(c) in table else -1 for c in codes[split:, level]]
        levels.append({"level": level, "accuracy": round(float(np.mean(np.array(predicted) == labels[split:])), 3),
                       "distinct_codes": len(table)})
    print(json.dumps({"run": str(run), "quantizer": config.quantizer, "paradigm": config.paradigm,
                      "patches": int(len(labels)), "coverage": args.coverage, "colours": len(COLORS),
                      "chance": round(chance, 3), "levels": levels}))


if __name__ == "__main__":
    main()
