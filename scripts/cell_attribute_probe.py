"""How much one cell's codes say about the shape they show: what the LLM can read without combining cells.

    python scripts/cell_attribute_probe.py <mllm folder> [<mllm folder> ...] [--scenes 800]

On single-shape test scenes (jittered, as the understanding rows see them), every code position whose codes differ
from the blank image's is a cell of the shape. Per cell, for the shape's colour, shape and size, it prints:
- `linear`: a logistic-regression probe on what the LLM reads at that position (the sum of the cell's code rows,
  `image_input_embeddings`), trained on 70 % of the cells and scored on the rest;
- `lookup`: the most frequent attribute of each (level-1, level-2) code pair in the training cells, scored on the
  rest (pairs not seen count as wrong);
- and the distinct codes per level over the shape's cells;
- per scene, over the code positions of the shape's layout cell (a 2 x 2 block on the 6 x 6 grid): `block sum linear`
  and `block sum mlp` on the sum of their rows (what one attention head can gather there, read by a linear layer or a
  one-hidden-layer MLP), and `block concat linear` on their rows side by side. Where these are far above what the
  MLLM answers, the codes say it and the LLM has not learnt to read it (docs/results.md, "What the LLM reads").
An image-wide decoder can take a cell's colour from its neighbours, so a tokenizer may leave it out of most cells;
the LLM then has to learn colour from combinations of cells (docs/results.md, "Colour in every cell").
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from per_model_report import run_over_models, single_shape_code_maps  # noqa: E402

from modeling_unicode.quantization_unicode import embedding_rows  # noqa: E402
from training.data.shapes import GRID  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402

ATTRIBUTES = ("color", "shape", "size")


def standardised(train_x, test_x):
    """Both sets scaled by the training set's per-feature mean and spread."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe(train_x, train_y, test_x, test_y) -> float:
    train_x, test_x = standardised(train_x, test_x)
    weight = torch.zeros(train_x.shape[1], int(train_y.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def mlp_probe(train_x, train_y, test_x, test_y, hidden: int = 512, epochs: int = 100) -> float:
    train_x, test_x = standardised(train_x, test_x)
    net = torch.nn.Sequential(
        torch.nn.Linear(train_x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, int(train_y.max()) + 1)
    )
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_y)).split(256):
            loss = torch.nn.functional.cross_entropy(net(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((net(test_x).argmax(1) == test_y).float().mean())


def pair_lookup(train_pairs, train_y, test_pairs, test_y) -> float:
    votes: dict = {}
    for pair, label in zip(train_pairs, train_y.tolist()):
        votes.setdefault(pair, []).append(label)
    hits = sum(
        pair in votes and max(set(votes[pair]), key=votes[pair].count) == label
        for pair, label in zip(test_pairs, test_y.tolist())
    )
    return hits / len(test_pairs)


def probe(path: str, num_scenes: int) -> dict:
    model, _ = load_model_and_processor(path)
    model.eval()
    scenes, maps, blank = single_shape_code_maps(model, 777, num_scenes, jitter=True)
    with torch.no_grad():
        rows = embedding_rows(model.get_input_embeddings(), maps.reshape(-1)).reshape(*maps.shape, -1).float()
    values = {name: sorted({scene["objects"][0][name] for scene in scenes}) for name in ATTRIBUTES}
    features, pairs, labels = [], [], {name: [] for name in ATTRIBUTES}
    for index, (scene, code_map) in enumerate(zip(scenes, maps)):
        for row, col in (code_map != blank).any(-1).nonzero().tolist():
            features.append(rows[index, row, col].sum(0))  # what the LLM reads there (RQ: the levels' sum)
            pairs.append(tuple(code_map[row, col].tolist()))
            for name in ATTRIBUTES:
                labels[name].append(values[name].index(scene["objects"][0][name]))
    features, cut = torch.stack(features), int(0.7 * len(pairs))
    result = {"cells": len(pairs)}
    for name in ATTRIBUTES:
        y = torch.tensor(labels[name])
        result[name] = {
            "linear": linear_probe(features[:cut], y[:cut], features[cut:], y[cut:]),
            "lookup": pair_lookup(pairs[:cut], y[:cut], pairs[cut:], y[cut:]),
            "majority": float(torch.bincount(y).max()) / len(y),
        }
    result["distinct codes per level"] = [len({pair[level] for pair in pairs}) for level in range(maps.shape[-1])]

    # Per scene: the code positions under the shape's layout cell (the grid is a whole multiple of the layout).
    per_cell = maps.shape[1] // GRID
    blocks = torch.stack(
        [
            rows[
                index, o["row"] * per_cell : (o["row"] + 1) * per_cell, o["col"] * per_cell : (o["col"] + 1) * per_cell
            ]
            .sum(2)  # RQ: the levels' sum at each position
            .reshape(per_cell * per_cell, -1)
            for index, o in enumerate(scene["objects"][0] for scene in scenes)
        ]
    )
    cut = int(0.7 * len(scenes))
    summed, side_by_side = blocks.sum(1), blocks.flatten(1)
    for name in ATTRIBUTES:
        y = torch.tensor([values[name].index(scene["objects"][0][name]) for scene in scenes])
        result[name].update(
            {
                "block sum linear": linear_probe(summed[:cut], y[:cut], summed[cut:], y[cut:]),
                "block sum mlp": mlp_probe(summed[:cut], y[:cut], summed[cut:], y[cut:]),
                "block concat linear": linear_probe(side_by_side[:cut], y[:cut], side_by_side[cut:], y[cut:]),
            }
        )
    return result


if __name__ == "__main__":
    run_over_models(__doc__, probe, default_scenes=800)
