"""The Shapes world: procedural scenes of coloured shapes with exact scene graphs.

Every example is regenerated from ``(seed, split, index)`` alone, so a dataset of any size is
byte-identical across runs and machines, and one example can be rebuilt without the others.

Scene graph (the ``scene`` column, a JSON string)::

    {"image_size": 64,
     "objects": [{"shape": "circle", "color": "red", "size": "large",
                  "position": "top left", "row": 0, "col": 0,
                  "center": [10.9, 11.2], "radius": 8.1}, ...]}

Objects are listed in grid order (row-major), one per grid cell, with unique (color, shape)
pairs, so "the red circle" always names exactly one object.

Dataset row schema (`build_shapes_world` / `load_shapes_world`)::

    id         string                      "train-000012"
    image      datasets.Image              RGB PNG, image_size x image_size
    scene      string                      the scene graph above, as JSON
    captions   list[string]                every caption phrasing (CAPTION_TEMPLATES order)
    questions  list[{question, answer, type}]   type in QUESTION_TYPES

The vocabulary (COLORS, SHAPES, SIZES, POSITIONS) lives here and only here: the generator, the
scene parser, captions, questions and the metrics all read it from this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import datasets
import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Vocabulary: the one place it is defined.

BACKGROUND = (255, 255, 255)
# Far apart in RGB and from white, so that a pixel blended with the background can still be
# attributed to exactly one colour (see scene_parser).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 190, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
    "cyan": (0, 180, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Radius as a fraction of a grid cell. Large shapes leave a margin so that shapes in adjacent
# cells never touch, even after blur.
SIZES: dict[str, float] = {"small": 0.27, "large": 0.41}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
GRID = 3
MAX_OBJECTS = 3
SPLITS: tuple[str, ...] = ("train", "validation", "test", "compositional")
SUPPORTED_IMAGE_SIZES = (32, 64, 128, 256)
SUPERSAMPLE = 4

# Colour-shape pairs kept out of train/validation/test and used only by the compositional
# split. One per colour, spread over the shapes, so every colour and every shape is still seen
# in training, just never in these combinations.
COMPOSITIONAL_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (color, SHAPES[i % len(SHAPES)]) for i, color in enumerate(COLORS)
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in COMPOSITIONAL_PAIRS)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in COMPOSITIONAL_PAIRS)

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Sizes and seed of a Shapes world build."""

    num_train: int = 1000
    num_validation: int = 100
    num_test: int = 100
    num_compositional: int = 100
    image_size: int = 64
    seed: int = 0
    # Sub-cell jitter makes pixels vary between scenes with the same graph; the shape always
    # stays inside its cell, so the graph is unchanged.
    jitter: bool = True

    def __post_init__(self):
        _check_image_size(self.image_size)
        for name in ("num_train", "num_validation", "num_test", "num_compositional"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_image_size(image_size) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(
            f"image_size must be an int >= 32 (the parser is exact from 64 px; tested sizes: "
            f"{SUPPORTED_IMAGE_SIZES}), got {image_size!r}"
        )


# ---------------------------------------------------------------------------------------------
# Sampling


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one example: a pure function of (seed, split, index)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def sample_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    *,
    pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS,
    num_objects: int | None = None,
    jitter: bool = True,
) -> dict:
    """A random scene: 1-3 shapes in distinct grid cells with distinct (color, shape) pairs."""
    _check_image_size(image_size)
    pairs = list(pairs)
    if num_objects is None:
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= num_objects <= min(len(pairs), GRID * GRID):
        raise ValueError(f"num_objects must be in 1..{min(len(pairs), GRID * GRID)}, got {num_objects}")
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=num_objects, replace=False))
    chosen = rng.choice(len(pairs), size=num_objects, replace=False)
    cell_px = image_size / GRID
    objects = []
    for cell, pair_index in zip(cells, chosen):
        color, shape = pairs[int(pair_index)]
        size = ("small", "large")[int(rng.integers(2))]
        row, col = divmod(cell, GRID)
        radius = SIZES[size] * cell_px
        # Keep a margin of 0.07 cell to the cell border so neighbours never touch.
        slack = max(0.0, 0.5 * cell_px - radius - 0.07 * cell_px) if jitter else 0.0
        dx, dy = rng.uniform(-slack, slack, size=2) if slack > 0 else (0.0, 0.0)
        cx = (col + 0.5) * cell_px + float(dx)
        cy = (row + 0.5) * cell_px + float(dy)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": size,
                "position": POSITIONS[cell],
                "row": row,
                "col": col,
                "center": [round(cx, 3), round(cy, 3)],
                "radius": round(radius, 3),
            }
        )
    return {"image_size": int(image_size), "objects": objects}


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_outline(shape: str, cx: float, cy: float, r: float):
    """Polygon or ellipse box for a shape whose extent is about 2r, in pixel coordinates."""
    if shape == "circle":
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        # Slightly smaller than the circle's box so both look the same size.
        h = 0.9 * r
        return "polygon", [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Pointing up, its centroid at (cx, cy + small offset) so its box is centred on the cell.
        return "polygon", [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return "polygon", [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_coverage(shape: str, center, radius: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape over ``box = (y0, x0, height, width)``
    (pixel coordinates): drawn at 4x, box-filtered down. The renderer and the scene parser's
    template fit both use this, so they share one geometry."""
    y0, x0, h, w = box
    mask = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = (center[0] - x0) * SUPERSAMPLE, (center[1] - y0) * SUPERSAMPLE
    kind, geom = _shape_outline(shape, cx, cy, radius * SUPERSAMPLE)
    if kind == "ellipse":
        draw.ellipse(geom, fill=255)
    else:
        draw.polygon(geom, fill=255)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def shape_centroid_offset(shape: str, radius: float) -> tuple[float, float]:
    """Centroid minus drawing centre: only the triangle's centroid sits off centre."""
    return (0.0, 0.2 * radius) if shape == "triangle" else (0.0, 0.0)


def render_scene(scene: dict | str, image_size: int | None = None) -> Image.Image:
    """Render a scene graph to an RGB image.

    ``image_size`` defaults to the scene's own; a different size rescales the geometry, so one
    graph renders at 32/64/128/256 px alike.
    """
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    native = int(scene.get("image_size", 64))
    image_size = native if image_size is None else image_size
    _check_image_size(image_size)
    scale = image_size / native
    canvas = np.empty((image_size, image_size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene["objects"]:
        if obj["color"] not in COLORS:
            raise ValueError(f"object color must be one of {list(COLORS)}, got {obj['color']!r}")
        if "center" not in obj:
            obj = {**obj, **_default_geometry(obj, native)}
        scaled = {**obj, "center": [c * scale for c in obj["center"]], "radius": obj["radius"] * scale}
        box = (0, 0, image_size, image_size)
        alpha = shape_coverage(obj["shape"], scaled["center"], scaled["radius"], box)[..., None]
        canvas = canvas * (1.0 - alpha) + np.asarray(COLORS[obj["color"]], np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _default_geometry(obj: dict, image_size: int) -> dict:
    """Centre of the cell and the nominal radius, for scene requests that carry no geometry."""
    cell_px = image_size / GRID
    row, col = divmod(POSITIONS.index(obj["position"]), GRID)
    return {"center": [(col + 0.5) * cell_px, (row + 0.5) * cell_px], "radius": SIZES[obj["size"]] * cell_px}


# ---------------------------------------------------------------------------------------------
# Scene graph helpers


def scene_to_json(scene: dict) -> str:
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


def scene_from_json(text: str) -> dict:
    try:
        scene = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"scene must be a JSON scene graph; could not decode: {error}") from None
    if not isinstance(scene, dict) or "objects" not in scene:
        raise ValueError("scene must be a JSON object with an 'objects' list")
    return scene


def canonical_objects(scene: dict | str) -> tuple[tuple[str, str, str, str], ...]:
    """(position, color, shape, size) per object, grid-ordered: equal iff the graphs agree."""
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    items = [(o["position"], o["color"], o["shape"], o["size"]) for o in scene["objects"]]
    return tuple(sorted(items, key=lambda t: POSITIONS.index(t[0])))


def object_phrase(obj: dict, with_size: bool = True) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}" if with_size else f"{obj['color']} {obj['shape']}"


def indefinite_article(word: str) -> str:
    """'an' before a vowel sound ('an orange'), else 'a'; the Shapes words have no silent or voiced exceptions."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def position_phrase(position: str) -> str:
    """'in the top left', 'in the center'."""
    return f"in the {position}"


# ---------------------------------------------------------------------------------------------
# Captions: every template names size, color, shape and position of every object, in grid
# order, so any caption can be turned back into the scene request (scene_from_caption).


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int) -> str:
    return f"{_NUMBER_WORDS[n]} shape" + ("" if n == 1 else "s")


CAPTION_TEMPLATES: tuple[str, ...] = (
    "list",  # a large red circle in the top left and a small blue square in the center.
    "there_is",  # There is a large red circle in the top left. There is a small ...
    "count",  # Two shapes: a large red circle in the top left and a small blue ...
    "located",  # In the top left, a large red circle; in the center, a small blue square.
)


def caption_for_scene(scene: dict | str, template: str = "list") -> str:
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    objs = scene["objects"]
    if not objs:
        raise ValueError("scene has no objects; captions need at least one")
    if template == "list":
        return _join([f"a {object_phrase(o)} {position_phrase(o['position'])}" for o in objs]) + "."
    if template == "there_is":
        return " ".join(f"There is a {object_phrase(o)} {position_phrase(o['position'])}." for o in objs)
    if template == "count":
        head = _count_phrase(len(objs)).capitalize()
        return f"{head}: " + _join([f"a {object_phrase(o)} {position_phrase(o['position'])}" for o in objs]) + "."
    if template == "located":
        parts = [f"{position_phrase(o['position'])}, a {object_phrase(o)}" for o in objs]
        text = "; ".join(parts) + "."
        return text[0].upper() + text[1:]
    raise ValueError(f"template must be one of {CAPTION_TEMPLATES}, got {template!r}")


def captions_for_scene(scene: dict | str) -> list[str]:
    return [caption_for_scene(scene, t) for t in CAPTION_TEMPLATES]


_ALT = lambda words: "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))  # noqa: E731
_OBJECT_RE = re.compile(rf"\b({_ALT(SIZES)})\s+({_ALT(COLORS)})\s+({_ALT(SHAPES)})\b")
_POSITION_RE = re.compile(rf"\bin the ({_ALT(POSITIONS)})\b")


def scene_from_caption(caption: str, image_size: int = 64) -> dict:
    """The scene request a caption describes: objects with size, color, shape and position.

    Accepts every CAPTION_TEMPLATES phrasing (and any text naming objects as
    '<size> <color> <shape>' with one 'in the <position>' each, in the same order).
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.lower()
    found = _OBJECT_RE.findall(text)
    positions = _POSITION_RE.findall(text)
    if not found or len(found) != len(positions):
        raise ValueError(
            f"caption must name each object as '<size> <color> <shape>' with one 'in the <position>' "
            f"each; found {len(found)} objects and {len(positions)} positions in {caption!r}"
        )
    objects = []
    for (size, color, shape), position in zip(found, positions):
        row, col = divmod(POSITIONS.index(position), GRID)
        objects.append({"shape": shape, "color": color, "size": size, "position": position, "row": row, "col": col})
    if len({o["position"] for o in objects}) != len(objects):
        raise ValueError(f"caption places two objects in the same cell: {caption!r}")
    objects.sort(key=lambda o: POSITIONS.index(o["position"]))
    return {"image_size": int(image_size), "objects": objects}


def scene_request(reference: dict | str, image_size: int = 64) -> dict:
    """A scene graph from a dict, a JSON scene graph or a caption."""
    if isinstance(reference, dict):
        return reference
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a scene dict, a JSON string or a caption, got {type(reference).__name__}")
    if reference.lstrip().startswith("{"):
        return scene_from_json(reference)
    return scene_from_caption(reference, image_size)


# ---------------------------------------------------------------------------------------------
# Questions


QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "size", "count", "existence", "position", "relation")
YES_NO_TYPES: tuple[str, ...] = ("existence", "relation")  # answered "yes" or "no"
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape} {position_phrase}?",),
    "shape": ("What shape is {position_phrase}?",),
    "size": ("Is the {color} {shape} large or small?",),
    "count": ("How many shapes are there?", "How many {color} shapes are there?"),
    "existence": ("Is there {article} {color} {shape}?",),
    "position": ("Where is the {color} {shape}?",),
    "relation": (
        "Is the {color} {shape} to the left of the {color2} {shape2}?",
        "Is the {color} {shape} to the right of the {color2} {shape2}?",
    ),
}


def questions_for_scene(scene: dict | str, rng: np.random.Generator | None = None) -> list[dict]:
    """Question/answer pairs about a scene: at least one of each applicable type.

    Answers are short words ('red', 'circle', 'large', '2', 'yes', 'top left'). Relation
    questions need two objects in different columns; existence questions alternate present
    and absent pairs so that 'yes' is not always right.
    """
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    rng = rng if rng is not None else np.random.default_rng(0)
    objs = scene["objects"]
    qa: list[dict] = []

    def add(kind: str, template_index: int, answer: str, **slots):
        qa.append(_question(kind, template_index, answer, **slots))

    target = objs[int(rng.integers(len(objs)))]
    add("color", 0, target["color"], shape=target["shape"], position_phrase=position_phrase(target["position"]))
    add("shape", 0, target["shape"], position_phrase=position_phrase(target["position"]))
    add("size", 0, target["size"], color=target["color"], shape=target["shape"])
    add("position", 0, target["position"], color=target["color"], shape=target["shape"])
    add("count", 0, str(len(objs)))
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    add("count", 1, str(sum(o["color"] == color for o in objs)), color=color)

    qa.append(_existence_question(objs, rng))
    relation = _relation_question(objs, rng)
    if relation is not None:
        qa.append(relation)
    return qa


def _question(kind: str, template_index: int, answer: str, **slots) -> dict:
    """One question/answer pair: a template of `kind` filled with its slots, and its answer."""
    return {"question": QUESTION_TEMPLATES[kind][template_index].format(**slots), "answer": answer, "type": kind}


def _yes_no(kind: str, template_index: int, truth: bool, **slots) -> dict:
    return _question(kind, template_index, "yes" if truth else "no", **slots)


def _existence_question(objs: list[dict], rng: np.random.Generator) -> dict:
    """A present (colour, shape) pair or an absent one, with even odds."""
    present = {(o["color"], o["shape"]) for o in objs}
    truth = bool(rng.random() < 0.5)
    choices = sorted(present) if truth else [p for p in ALL_PAIRS if p not in present]
    c, s = choices[int(rng.integers(len(choices)))]
    return _yes_no("existence", 0, truth, article=indefinite_article(c), color=c, shape=s)


def _relation_question(objs: list[dict], rng: np.random.Generator) -> dict | None:
    """Left of / right of, about two shapes in different columns (None when every shape shares one column)."""
    pairs = [(a, b) for a in objs for b in objs if a["col"] != b["col"]]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    which = int(rng.integers(2))
    truth = a["col"] < b["col"] if which == 0 else a["col"] > b["col"]
    return _yes_no("relation", which, truth, color=a["color"], shape=a["shape"], color2=b["color"], shape2=b["shape"])


# A yes/no answer can be written with its reasoning first, each step something the other question types already
# read from the image, and the comparison then made between words: an existence answer names the shapes of the named
# colour ("square and circle: no", "none: no"), a relation answer the two shapes' columns ("left and right: yes").
# The bare "yes" / "no" gives no gradient until the whole comparison is learnt; the steps give it from the first
# (docs/results.md, "Yes/no answers with their reasoning"). A relation answer is the XOR of the image (which shape is
# further left) and the question ("left of" or "right of"), and an XOR of words was not learnt in the steps the
# recipe has; so the columns are written in the order that makes the question a "left of" one, and "yes" means the
# first column written is left of the second, whichever way the question asked (docs/results.md, "Relation's two
# steps, one at a time").
#
# A position answer is reasoned the way existence is: the shapes of the named colour, each with its cell, so that its
# first step is the lookup by colour that existence answers learn, and the named shape's cell is then read off words
# the model has just written (docs/results.md, "Position tables drawn at the LLM's init, and position answers reasoned
# by colour": the colour's shapes come out right, the named one's cell does not, so the recipe does not use it).
REASONED_TYPES: tuple[str, ...] = ("existence", "relation", "position")
ANSWER_AFTER = ": "  # an answer written with its reasoning ends with ": " and the answer itself


def _slot_pattern(template: str) -> re.Pattern:
    """A template's question back into its slots: each "{name}" becomes a named group of one word."""
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\w+)", re.escape(template)) + "$")


# The types whose questions name shapes by colour (and shape): their slots are read back for reasoned answers and for
# the shapes a question refers to (`referred_objects`).
NAMING_TYPES: tuple[str, ...] = ("existence", "relation", "position", "size")
_QUESTION_PATTERNS = {kind: tuple(_slot_pattern(t) for t in QUESTION_TEMPLATES[kind]) for kind in NAMING_TYPES}


def _question_match(kind: str, question: str) -> re.Match:
    """The match of `question` against the template of `kind` it was written from (`match.re` says which)."""
    match = next((m for m in (p.match(question) for p in _QUESTION_PATTERNS[kind]) if m), None)
    if match is None:
        raise ValueError(f"question={question!r} is not a {kind} question of QUESTION_TEMPLATES[{kind!r}]")
    return match


def _question_slots(kind: str, question: str) -> dict:
    return _question_match(kind, question).groupdict()


def relation_columns(scene: dict | str, question: str) -> tuple[str, str]:
    """The columns ("left", "center", "right") of the two shapes a relation question names, in the question's order.
    A scene's (colour, shape) pairs are distinct, so the two words find them."""
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    slots = _question_slots("relation", question)
    by_pair = {(o["color"], o["shape"]): o for o in scene["objects"]}
    named = [(slots["color"], slots["shape"]), (slots["color2"], slots["shape2"])]
    missing = [pair for pair in named if pair not in by_pair]
    if missing:
        raise ValueError(f"question={question!r} names {missing}, which the scene does not hold")
    return tuple(COLS[by_pair[pair]["col"]] for pair in named)


def objects_of_colour(scene: dict | str, qa: dict) -> list[dict]:
    """The objects (in the scene's cell order) that have the colour a question (an existence or position `qa`)
    names."""
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    colour = _question_slots(qa["type"], qa["question"])["color"]
    return [o for o in scene["objects"] if o["color"] == colour]


def referred_objects(scene: dict | str, qa: dict) -> list[dict]:
    """The objects a question is about, which its answer must be read from: the shape in the named cell (colour and
    shape questions), the named shape (position, size), the two named shapes (relation), the shapes of the named
    colour (existence: those its reasoned answer lists; none when the colour is absent). [] for counts."""
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    if qa["type"] in ("color", "shape"):  # they name a cell: "... in the top left?"
        return [o for o in scene["objects"] if qa["question"].endswith(position_phrase(o["position"]) + "?")]
    if qa["type"] not in NAMING_TYPES:
        return []
    if qa["type"] == "existence":
        return objects_of_colour(scene, qa)
    slots = _question_slots(qa["type"], qa["question"])
    named = [(slots["color"], slots["shape"])] + ([(slots["color2"], slots["shape2"])] if "color2" in slots else [])
    return [o for pair in named for o in scene["objects"] if (o["color"], o["shape"]) == pair]


def asks_left_of(question: str) -> bool:
    """Whether a relation question asks "to the left of" (QUESTION_TEMPLATES["relation"][0]) or "to the right of"."""
    return _question_match("relation", question).re is _QUESTION_PATTERNS["relation"][0]


def reasoned_answer(scene: dict | str, qa: dict, cells: bool = False) -> str:
    """An answer with its reasoning first. Relation: "<column> and <column>: <answer>", the named shapes'
    columns ordered as the question read as "is the first left of the second?" (for "Is A to the right of B?", B's
    column first). Existence: "<the shapes of the named colour, or none>: <answer>". Position: each shape of the
    named colour with its cell, then the named one's ("circle top left and square center: top left"). With `cells`,
    existence names each shape's cell too ("square top left and triangle center: no"), the step a position answer
    takes. Other types unchanged."""
    if qa["type"] == "relation":
        columns = relation_columns(scene, qa["question"])
        steps = " and ".join(columns if asks_left_of(qa["question"]) else columns[::-1])
    elif qa["type"] == "existence":
        named = objects_of_colour(scene, qa)
        steps = " and ".join(f"{o['shape']} {o['position']}" if cells else o["shape"] for o in named) or "none"
    elif qa["type"] == "position":
        steps = " and ".join(f"{o['shape']} {o['position']}" for o in objects_of_colour(scene, qa))
    else:
        return qa["answer"]
    return f"{steps}{ANSWER_AFTER}{qa['answer']}"


def check_reasoned_types(kinds) -> list[str]:
    """Refuse anything but a list of question types from REASONED_TYPES; returns it as a list."""
    kinds = list(kinds or [])
    unknown = [kind for kind in kinds if kind not in REASONED_TYPES]
    if unknown:
        raise ValueError(
            f"reasoned_answers={kinds}: {unknown} cannot be answered with reasoning (types that can: "
            f"{list(REASONED_TYPES)})"
        )
    return kinds


def final_answer(text: str) -> str:
    """The answer of a reply that may carry its reasoning first ("left and right: yes" -> "yes")."""
    return text.rsplit(ANSWER_AFTER.strip(), 1)[-1].strip()


def check_question_count(count, what: str) -> None:
    """Refuse anything but a whole number >= 0 of questions to ask (`what` says which, in the error)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count={count!r} must be a whole number >= 0 ({what})")


def check_yes_no_counts(counts: dict) -> None:
    """Refuse anything but {yes/no question type: whole number >= 0}."""
    for kind, count in counts.items():
        if kind not in YES_NO_TYPES:
            raise ValueError(
                f"kind={kind!r} is not a yes/no question type (yes/no question types: {list(YES_NO_TYPES)})"
            )
        check_question_count(count, f"questions of type {kind!r} to add")


def yes_no_questions(scene: dict | str, kind: str, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` more questions of a yes/no type about a scene, drawn as `questions_for_scene` draws its own (so the
    answers keep its even odds). A scene with every shape in one column has no relation questions: [] then.

    Why more of them: a yes/no answer compares the question's words with the image, and neither alone says
    anything about it, so its loss gives no signal until the comparison is learnt (docs/results.md, "What the LLM
    reads"); the other types answer from the image alone."""
    check_yes_no_counts({kind: count})
    objs = (scene_from_json(scene) if isinstance(scene, str) else scene)["objects"]
    draw = _existence_question if kind == "existence" else _relation_question
    drawn = [draw(objs, rng) for _ in range(int(count))]
    return [qa for qa in drawn if qa is not None]


def position_questions(scene: dict | str, count: int, rng: np.random.Generator) -> list[dict]:
    """Position questions ("Where is the <colour> <shape>?") about `count` distinct shapes of a scene (every shape
    when it holds fewer), in random order.

    Why more of them: in a scene of two or three shapes the position answer must find the shape the question names,
    and at the recipe's one position question in two scenes it answers the cell of a shape picked at random; the
    named shape's cell is what relation and the other lookups by name build on (docs/results.md, "Relation's
    reading: which named shape stands where")."""
    check_question_count(count, "position questions to ask")
    objs = (scene_from_json(scene) if isinstance(scene, str) else scene)["objects"]
    asked = [objs[int(i)] for i in rng.permutation(len(objs))[: int(count)]]
    return [_question("position", 0, o["position"], color=o["color"], shape=o["shape"]) for o in asked]


# ---------------------------------------------------------------------------------------------
# Examples, splits, datasets


def make_example(seed: int, split: str, index: int, image_size: int = 64, jitter: bool = True) -> dict:
    """One example (PIL image, scene JSON, captions, questions), regenerated from its address."""
    rng = example_rng(seed, split, index)
    pairs = HELD_OUT_PAIRS if split == "compositional" else TRAIN_PAIRS
    scene = sample_scene(rng, image_size, pairs=pairs, jitter=jitter)
    return {
        "id": f"{split}-{index:06d}",
        "image": render_scene(scene),
        "scene": scene_to_json(scene),
        "captions": captions_for_scene(scene),
        "questions": questions_for_scene(scene, rng),
    }


def shapes_features():
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "scene": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
            "questions": datasets.List(
                {
                    "question": datasets.Value("string"),
                    "answer": datasets.Value("string"),
                    "type": datasets.Value("string"),
                }
            ),
        }
    )


def build_split(split: str, num_examples: int, image_size: int = 64, seed: int = 0, jitter: bool = True):
    """One split as a `datasets.Dataset`."""

    if not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    rows = [make_example(seed, split, i, image_size, jitter) for i in range(num_examples)]
    columns = {name: [row[name] for row in rows] for name in shapes_features()}
    return datasets.Dataset.from_dict(columns, features=shapes_features(), split=datasets.NamedSplit(split))


def build_shapes_world(
    num_train: int = 1000,
    num_val: int = 100,
    num_test: int = 100,
    num_compositional: int = 100,
    image_size: int = 64,
    seed: int = 0,
    jitter: bool = True,
):
    """The Shapes world as a `datasets.DatasetDict` with train/validation/test/compositional."""
    config = ShapesWorldConfig(num_train, num_val, num_test, num_compositional, image_size, seed, jitter)
    return load_shapes_world(config)


def load_shapes_world(config: ShapesWorldConfig | None = None, **overrides):
    """`build_shapes_world` from a `ShapesWorldConfig` (fields may be overridden by keyword)."""

    config = config or ShapesWorldConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    sizes = {
        "train": config.num_train,
        "validation": config.num_validation,
        "test": config.num_test,
        "compositional": config.num_compositional,
    }
    return datasets.DatasetDict(
        {split: build_split(split, n, config.image_size, config.seed, config.jitter) for split, n in sizes.items()}
    )


def text_corpus(source: Iterable[dict] | None = None, *, num_scenes: int = 1000, seed: int = 0) -> Iterator[str]:
    """Lines of text for LM training: every caption, then every question with its answer.

    ``source`` is a Shapes world split (or any iterable of rows with ``captions`` and
    ``questions``); without it, ``num_scenes`` train scenes are sampled (no rendering).
    """
    if source is None:

        def rows():
            for i in range(num_scenes):
                rng = example_rng(seed, "train", i)
                scene = sample_scene(rng, 64, pairs=TRAIN_PAIRS)
                yield {"captions": captions_for_scene(scene), "questions": questions_for_scene(scene, rng)}

        source = rows()
    for row in source:
        yield from row["captions"]
        for qa in row["questions"]:
            yield f"Question: {qa['question']} Answer: {qa['answer']}"


def shapes_world_fingerprint(num_examples: int = 16) -> str:
    """A short sha256 of what this code generates: the first train scenes' pixels, scene JSON, captions
    and questions, and the stage-0 text of those scenes. The world is code, not a setting, so a run
    folder records this beside its settings: stages trained on text or images an older version made
    (say "a orange" before `indefinite_article`) are then refused instead of silently reused."""
    digest = hashlib.sha256()
    for index in range(num_examples):
        example = make_example(0, "train", index)
        digest.update(np.asarray(example["image"]).tobytes())
        digest.update(json.dumps([example[k] for k in ("scene", "captions", "questions")], sort_keys=True).encode())
    for line in text_corpus(num_scenes=num_examples):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:16]


def color_shape_pairs(scene: dict | str) -> set[tuple[str, str]]:
    scene = scene_from_json(scene) if isinstance(scene, str) else scene
    return {(o["color"], o["shape"]) for o in scene["objects"]}
