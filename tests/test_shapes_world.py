"""Shapes world generator: determinism, splits, rendering, captions, questions."""

import datasets
import numpy as np
import pytest

from training.data import shapes
from training.data.shapes import (
    CAPTION_TEMPLATES,
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    TRAIN_PAIRS,
    build_shapes_world,
    canonical_objects,
    captions_for_scene,
    color_shape_pairs,
    make_example,
    questions_for_scene,
    render_scene,
    sample_scene,
    scene_from_caption,
    scene_from_json,
    shape_coverage,
    shapes_world_fingerprint,
    text_corpus,
)


def _raw(dataset_dict):
    """Every split with undecoded image bytes, for byte comparison."""
    return {
        name: split.cast_column("image", datasets.Image(decode=False)).to_dict()
        for name, split in dataset_dict.items()
    }


@pytest.fixture(scope="module")
def world():
    return build_shapes_world(num_train=40, num_val=8, num_test=8, num_compositional=12, seed=0)


def test_same_seed_is_byte_identical_and_other_seed_differs(world):
    again = build_shapes_world(num_train=40, num_val=8, num_test=8, num_compositional=12, seed=0)
    assert _raw(world) == _raw(again)
    other = build_shapes_world(num_train=40, num_val=8, num_test=8, num_compositional=12, seed=1)
    first, second = _raw(world)["train"], _raw(other)["train"]
    assert first["scene"] != second["scene"]
    assert sum(a["bytes"] != b["bytes"] for a, b in zip(first["image"], second["image"])) > 30


def test_one_example_regenerates_alone(world):
    row = world["test"].cast_column("image", datasets.Image(decode=False))[5]
    example = make_example(0, "test", 5)
    assert example["scene"] == row["scene"] and example["captions"] == row["captions"]
    # The Image feature stores PNG; decode both sides and compare pixels exactly.
    assert np.array_equal(np.asarray(world["test"][5]["image"]), np.asarray(example["image"]))


def test_splits_schema_and_features(world):
    assert list(world) == ["train", "validation", "test", "compositional"]
    assert [len(world[s]) for s in world] == [40, 8, 8, 12]
    features = world["train"].features
    assert isinstance(features["image"], datasets.Image)
    row = world["train"][0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert len(row["captions"]) == len(CAPTION_TEMPLATES)
    assert {"question", "answer", "type"} == set(row["questions"][0])
    mapped = world["validation"].map(lambda r: {"n": len(scene_from_json(r["scene"])["objects"])})
    assert all(1 <= n <= 3 for n in mapped["n"])


def test_compositional_split_shares_no_colour_shape_pair_with_train():
    big = build_shapes_world(num_train=300, num_val=50, num_test=50, num_compositional=100, seed=3)
    seen = {split: set().union(*(color_shape_pairs(s) for s in big[split]["scene"])) for split in big}
    assert seen["compositional"] and not seen["compositional"] & seen["train"]
    assert seen["compositional"] <= set(HELD_OUT_PAIRS)
    for split in ("train", "validation", "test"):
        assert seen[split] <= set(TRAIN_PAIRS)
    # Every colour and every shape is still learned in train, only the pairs are new.
    assert {c for c, _ in seen["train"]} == set(COLORS) and {s for _, s in seen["train"]} == set(SHAPES)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_render_sizes_and_non_overlap(size):
    rng = np.random.default_rng(size)
    for _ in range(10):
        scene = sample_scene(rng, size)
        image = render_scene(scene)
        assert image.size == (size, size)
        box = (0, 0, size, size)
        masks = [shape_coverage(o["shape"], o["center"], o["radius"], box) > 0 for o in scene["objects"]]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()
        assert len({(o["color"], o["shape"]) for o in scene["objects"]}) == len(scene["objects"])


def test_render_is_anti_aliased_on_a_white_background():
    scene = {"image_size": 64, "objects": [{"shape": "circle", "color": "red", "size": "large", "position": "center"}]}
    pixels = np.asarray(render_scene(scene)).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert (255, 255, 255) in colours and COLORS["red"] in colours
    assert len(colours) > 5  # edge pixels are blends, not two flat colours


def test_captions_round_trip_to_the_scene():
    rng = np.random.default_rng(7)
    for _ in range(50):
        scene = sample_scene(rng, 64)
        captions = captions_for_scene(scene)
        assert len(set(captions)) == len(CAPTION_TEMPLATES)
        for caption in captions:
            assert canonical_objects(scene_from_caption(caption)) == canonical_objects(scene)


def test_scene_from_caption_rejects_text_it_cannot_ground():
    with pytest.raises(ValueError, match="caption"):
        scene_from_caption("a red circle")  # no size, no position
    with pytest.raises(TypeError):
        scene_from_caption(3)


# A red circle top left and a blue square bottom right: every question about it has one right answer.
TWO_SHAPES = {
    "image_size": 64,
    "objects": [
        {"shape": "circle", "color": "red", "size": "large", "position": "top left", "row": 0, "col": 0},
        {"shape": "square", "color": "blue", "size": "small", "position": "bottom right", "row": 2, "col": 2},
    ],
}


def test_questions_answer_correctly_on_a_hand_made_scene():
    scene = TWO_SHAPES
    kinds = set()
    for seed in range(40):
        for qa in questions_for_scene(scene, np.random.default_rng(seed)):
            kinds.add(qa["type"])
            q, a = qa["question"], qa["answer"]
            if q == "How many shapes are there?":
                assert a == "2"
            if q.startswith("Is the red circle to the left of the blue square"):
                assert a == "yes"
            if q.startswith("Is the red circle to the right of"):
                assert a == "no"
            if q == "What shape is in the bottom right?":
                assert a == "square"
            if q == "Where is the red circle?":
                assert a == "top left"
            if q == "How many blue shapes are there?":
                assert a == "1"
            if q == "How many green shapes are there?":
                assert a == "0"
            if q.startswith("Is there "):
                present = q[len("Is there ") : -1].split(" ", 1)[1] in ("red circle", "blue square")
                assert a == ("yes" if present else "no")
    assert kinds == set(shapes.QUESTION_TYPES)


def test_existence_questions_take_the_article_their_colour_needs():
    scene = {
        "image_size": 64,
        "objects": [
            {"shape": "triangle", "color": "orange", "size": "large", "position": "center", "row": 1, "col": 1},
        ],
    }
    asked = set()
    for seed in range(40):
        for qa in questions_for_scene(scene, np.random.default_rng(seed)):
            if qa["type"] == "existence":
                asked.add(qa["question"])
                assert not qa["question"].startswith("Is there a orange"), qa["question"]
    assert "Is there an orange triangle?" in asked  # the present pair is asked about half the time
    assert any(q.startswith("Is there a ") for q in asked)  # consonant colours keep "a"


def test_answers_with_their_reasoning_name_what_the_image_shows_and_end_with_the_answer():
    seen, asked_ways = set(), set()
    for index in range(60):
        example = shapes.make_example(0, "train", index, image_size=48)
        scene = shapes.scene_from_json(example["scene"])
        for qa in shapes.questions_for_scene(scene, np.random.default_rng(index)):
            reasoned = shapes.reasoned_answer(scene, qa)
            if qa["type"] not in shapes.REASONED_TYPES:
                assert reasoned == qa["answer"]  # only yes/no answers carry their reasoning
                continue
            seen.add(qa["type"])
            steps = reasoned.split(": ")[0].split(" and ")
            assert shapes.final_answer(reasoned) == qa["answer"]
            if qa["type"] == "relation":
                named = [o for o in scene["objects"] if f"the {o['color']} {o['shape']}" in qa["question"]]
                order = sorted(named, key=lambda o: qa["question"].index(f"the {o['color']} {o['shape']}"))
                if " to the right of " in qa["question"]:  # written as "is the second left of the first?"
                    order = order[::-1]
                assert steps == [shapes.COLS[o["col"]] for o in order]
                # "yes" whenever the first column written is left of the second, whichever way the question asked
                assert qa["answer"] == ("yes" if order[0]["col"] < order[1]["col"] else "no")
                asked_ways.add(shapes.asks_left_of(qa["question"]))
            elif qa["type"] == "position":
                colour, shape = qa["question"][len("Where is the ") : -1].split(" ")
                coloured = [o for o in scene["objects"] if o["color"] == colour]
                # every shape of the named colour with its cell, in the scene's cell order; the named one among them
                assert steps == [f"{o['shape']} {o['position']}" for o in coloured]
                assert f"{shape} {qa['answer']}" in steps
            else:
                colour, shape = qa["question"][len("Is there ") : -1].split(" ", 1)[1].split(" ")
                coloured = [o["shape"] for o in scene["objects"] if o["color"] == colour]
                assert steps == (coloured or ["none"]) and qa["answer"] == ("yes" if shape in coloured else "no")
                # with cells, each shape of the colour with its cell, as a position answer's steps are written
                cells = [f"{o['shape']} {o['position']}" for o in scene["objects"] if o["color"] == colour]
                with_cells = shapes.reasoned_answer(scene, qa, cells=True)
                assert with_cells == " and ".join(cells or ["none"]) + ": " + qa["answer"]
    assert seen == set(shapes.REASONED_TYPES) and asked_ways == {True, False}
    assert shapes.final_answer("top left") == "top left" and shapes.final_answer(" 2 ") == "2"
    with pytest.raises(ValueError, match="is not a relation question"):
        shapes.relation_columns(TWO_SHAPES, "Is there a red circle?")
    with pytest.raises(ValueError, match="is not a relation question"):
        shapes.asks_left_of("Is the red circle above the blue square?")
    with pytest.raises(ValueError, match="which the scene does not hold"):
        shapes.relation_columns(TWO_SHAPES, "Is the green circle to the left of the blue square?")
    with pytest.raises(ValueError, match=r"\['count'\] cannot be answered with reasoning"):
        shapes.check_reasoned_types(["relation", "count"])


def test_yes_no_questions_are_answered_as_the_scene_says_with_even_odds():
    scene = TWO_SHAPES
    rng = np.random.default_rng(0)
    existence = shapes.yes_no_questions(scene, "existence", 400, rng)
    relation = shapes.yes_no_questions(scene, "relation", 400, rng)
    assert len(existence) == len(relation) == 400
    for qa in existence:
        named = qa["question"][len("Is there ") : -1].split(" ", 1)[1]
        assert qa["type"] == "existence" and qa["answer"] == (
            "yes" if named in ("red circle", "blue square") else "no"
        )
    for qa in relation:
        left_of = " to the left of " in qa["question"]
        red_first = qa["question"].startswith("Is the red circle")
        assert qa["type"] == "relation" and qa["answer"] == ("yes" if left_of == red_first else "no")
    for questions in (existence, relation):
        assert 150 < sum(qa["answer"] == "yes" for qa in questions) < 250
    one_column = {"image_size": 64, "objects": scene["objects"][:1]}
    assert shapes.yes_no_questions(one_column, "relation", 3, rng) == []
    with pytest.raises(ValueError, match="kind='color' is not a yes/no question type"):
        shapes.yes_no_questions(scene, "color", 1, rng)
    with pytest.raises(ValueError, match="count=-1 must be a whole number"):
        shapes.yes_no_questions(scene, "existence", -1, rng)


def test_fingerprint_is_stable_and_follows_the_generated_text(monkeypatch):
    first = shapes_world_fingerprint()
    assert first == shapes_world_fingerprint() and len(first) == 16
    monkeypatch.setattr(shapes, "indefinite_article", lambda word: "a")
    assert shapes_world_fingerprint() != first


def test_text_corpus_contains_captions_and_qa(world):
    lines = list(text_corpus(world["train"]))
    assert world["train"][0]["captions"][0] in lines
    assert any(line.startswith("Question: ") and " Answer: " in line for line in lines)
    sampled = list(text_corpus(num_scenes=5, seed=0))
    assert len(sampled) > 5 * len(CAPTION_TEMPLATES)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="image_size"):
        build_shapes_world(num_train=1, image_size=16)
    with pytest.raises(ValueError, match="split"):
        make_example(0, "training", 0)
    with pytest.raises(ValueError, match="num_train"):
        build_shapes_world(num_train=-1)
