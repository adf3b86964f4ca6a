"""How much of a patch's colour a run's visual codes carry: the question behind the demo's VQA.

    python scripts/code_semantics.py --run outputs/demo-tiny [--images 600] [--probes]

The run's visual tokenizer (`<run>/vision_tokenizer`, from `demo` or `train-tokenizer`) encodes
`--images` Shapes train scenes. For each code position, the label is the dominant Shapes colour of the
image patch under it (patches less than `--coverage` coloured are left
out). Per quantization level, a lookup table code id -> most frequent colour is fitted on 80 % of the
patches and scored on the rest (a code unseen in the fit counts as wrong). Chance is always answering
the most frequent colour. If the level-0 code of a patch that is all red does not say "red", an LM that
reads the codes has to decode colour from combinations of codes and their neighbours (docs/results.md, "What the
codes carry": codes that say more did not, alone, make the demo's LM ground).

`--probes` (a run with `mllm/`, VQ or RQ): the same patches' colour probed from vectors instead of ids,
with a linear (softmax) and a one-hidden-layer MLP probe fitted on the same 80 %: the LLM's own image
input at the patch (the aggregated rows, what stage II's LM reads) and the decoder-side quantized vector
(what the pixel decoder reads). If even those probes stay far from 100 %, a patch's colour is spread over
its neighbours' codes and the LM must learn to gather it.

Prints one JSON line: per level, held-out accuracy, chance, distinct codes; patches, coverage; probes.
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub_upload.run_folder import STAGE1_DIR  # noqa: E402
from modeling_unicode import UniCodeVisualTokenizer  # noqa: E402
from modeling_unicode.quantization_unicode import token_ids_to_code_indices  # noqa: E402
from training.data.scene_parser import patch_colours  # noqa: E402
from training.data.shapes import COLORS, build_split, render_scene  # noqa: E402
from training.stage1 import images_to_uint8, to_pixel_values  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder with vision_tokenizer/ (demo or train-tokenizer)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--coverage", type=float, default=0.6, help="least coloured fraction of a labelled patch")
    parser.add_argument(
        "--probes", action="store_true", help="also probe the LLM's image input vectors (needs <run>/mllm)"
    )
    args = parser.parse_args()

    run = Path(args.run)
    if not (run / "vision_tokenizer" / "config.json").is_file():
        raise SystemExit(f"--run {run} has no vision_tokenizer/; run `unicode-mllm demo` or `train-tokenizer` first")
    tokenizer = UniCodeVisualTokenizer.from_pretrained(run / "vision_tokenizer").eval()
    config = tokenizer.config
    metrics_path = run / STAGE1_DIR / "metrics.json"
    stage1_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    size, grid = config.image_size, config.code_grid_size
    scenes = build_split("train", args.images, image_size=size, seed=0)
    pixels = to_pixel_values(images_to_uint8(list(scenes["image"]), size, "Shapes scenes"))
    with torch.no_grad():
        code_maps = torch.cat([tokenizer.encode(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]).numpy()

    codes, labels, kept = [], [], []
    for code_map, scene in zip(code_maps, scenes["scene"]):  # code_map: (grid, grid, depth)
        colour = patch_colours(render_scene(scene, size), grid, args.coverage)
        keep = colour >= 0
        codes.append(code_map[keep])
        labels.append(colour[keep])
        kept.append(keep)
    codes, labels = np.concatenate(codes), np.concatenate(labels)
    if len(labels) < 10:
        raise SystemExit(
            f"only {len(labels)} patches of {grid}x{grid} are at least {args.coverage:.0%} one colour; "
            "lower --coverage (a coarse grid's patches are mostly background)"
        )
    split = len(labels) * 8 // 10
    chance = float(np.mean(labels[split:] == np.bincount(labels[:split]).argmax()))
    levels = []
    for level in range(config.depth):
        table: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for code, label in zip(codes[:split, level], labels[:split]):
            table[int(code)][int(label)] += 1
        predicted = [table[int(c)].most_common(1)[0][0] if int(c) in table else -1 for c in codes[split:, level]]
        levels.append(
            {
                "level": level,
                "accuracy": round(float(np.mean(np.array(predicted) == labels[split:])), 3),
                "distinct_codes": len(table),
            }
        )
    probes = vector_probes(run, pixels, np.stack(kept), labels, split) if args.probes else None
    print(
        json.dumps(
            {
                "run": str(run),
                "quantizer": config.quantizer,
                "paradigm": stage1_metrics.get("paradigm"),  # how stage I learned the codebook
                "patches": int(len(labels)),
                "coverage": args.coverage,
                "colours": len(COLORS),
                "chance": round(chance, 3),
                "levels": levels,
                **({"probes": probes} if probes else {}),
            }
        )
    )


def vector_probes(run: Path, pixels, keep, labels, split: int, seed: int = 0) -> dict:
    """Held-out colour accuracy of linear and MLP probes on the LLM's image input and on the
    decoder-side quantized vector, at the labelled patches (`keep`: (images, grid, grid))."""
    if not (run / "mllm" / "config.json").is_file():
        raise SystemExit(f"--probes needs {run}/mllm (a finished `unicode-mllm demo` or stage II)")
    model = load_model_and_processor(run / "mllm")[0].eval()
    vq = model.config.vq_config
    if vq.quantizer == "hq":
        raise SystemExit("--probes reads one vector per code position: VQ or RQ runs (HQ's input has 4 per top code)")
    with torch.no_grad():
        code_maps = torch.cat([model.model.encode_images(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
        llm_input = model.model.get_image_features(image_codes=code_maps).pooler_output  # (images, ĥ·ŵ, H)
        codebook = model.model.codebook().float()
        indices = token_ids_to_code_indices(code_maps, model.model.codebook_token_ids)
        decoder_side = model.model.vision_tokenizer.quantizer.lookup(indices, codebook).permute(0, 2, 3, 1)
    mask = torch.as_tensor(keep).reshape(len(pixels), -1)
    inputs = {
        "llm_image_input": llm_input.float()[mask],
        "decoder_quantized_vector": decoder_side.reshape(len(pixels), -1, decoder_side.shape[-1])[mask],
    }
    y = torch.as_tensor(labels).long()
    results = {}
    for name, x in inputs.items():
        x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
        for kind in ("linear", "mlp"):
            torch.manual_seed(seed)
            hidden = x.shape[1]
            probe = (
                torch.nn.Linear(hidden, len(COLORS))
                if kind == "linear"
                else torch.nn.Sequential(
                    torch.nn.Linear(hidden, 256), torch.nn.GELU(), torch.nn.Linear(256, len(COLORS))
                )
            )
            optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-2)
            for _ in range(600):
                loss = torch.nn.functional.cross_entropy(probe(x[:split]), y[:split])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                results[f"{name}_{kind}"] = round(float((probe(x[split:]).argmax(1) == y[split:]).float().mean()), 3)
    return results


if __name__ == "__main__":
    main()
