"""scripts/vqa_steps_probe.py's bag-of-codes baseline: the README's "the codes name the colour" figure
comes from it, so it must score what the code histograms do determine and not what they do not."""

import importlib.util
import random
from pathlib import Path
from types import SimpleNamespace

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "vqa_steps_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("vqa_steps_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_model(token_ids, depth):
    return SimpleNamespace(
        model=SimpleNamespace(codebook_token_ids=torch.tensor(token_ids)),
        config=SimpleNamespace(vq_config=SimpleNamespace(depth=depth, code_grid_size=2)),
    )


def rows(num, rng, colour_code_level):
    """A 2 x 2 grid, depth 2, flattened raster-then-depth; the answer's code sits at `colour_code_level` of one
    position."""
    palette = {"red": 110, "blue": 111, "green": 112}
    out = []
    for _ in range(num):
        answer = rng.choice(sorted(palette))
        codes = [rng.choice([100, 101, 102]) for _ in range(8)]
        codes[2 * rng.randrange(4) + colour_code_level] = palette[answer]
        out.append({"image_codes": codes, "answer": answer, "type": "color"})
    return out


def test_bag_of_codes_reads_what_the_codes_determine_and_no_more():
    probe = load_probe()
    rng = random.Random(0)
    model = fake_model([100, 101, 102, 110, 111, 112], depth=2)
    answers = ["blue", "green", "red"]
    train, test = rows(60, rng, 1), rows(30, rng, 1)
    assert probe.bag_of_codes(model, train, test, answers, ["color"])["color"] == 1.0

    # The same ids, but unrelated to the answers: nothing to read, far from perfect.
    shuffled = [{**r, "answer": rng.choice(answers)} for r in rows(60, rng, 1)]
    unrelated_test = [{**r, "answer": rng.choice(answers)} for r in rows(60, rng, 1)]
    assert probe.bag_of_codes(model, shuffled, unrelated_test, answers, ["color"])["color"] < 0.7
