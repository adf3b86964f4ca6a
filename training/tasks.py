"""Stage-II tasks as chat conversations over a code dataset, and their tokenization.

A task row is `{"task", "messages", "codes"}`: `codes` is the image's flattened code sequence (one
image per row) and each message's content is a list of items:
- `{"type": "text", "text": ...}`;
- `{"type": "image"}`: the image as INPUT — the processor's `<image>` placeholders, filled by the
  model with the aggregated (compressed) code embeddings of `codes`;
- `{"type": "codes", "start": a, "end": b}`: the code ids `codes[a:b]` written as vocabulary ids;
- `{"type": "boi"}` / `{"type": "eoi"}`: the image-span brackets.
Ids are spliced in directly, never through text: detokenizing and re-tokenizing code ids would not
round-trip. `tokenize_conversation` renders every turn with the processor's chat template, so a
model trained here sees exactly the prompts `UniCodeProcessor` builds at inference; loss only on
the assistant turns.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

import datasets
import numpy as np

from modeling_unicode import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from modeling_unicode.processing_unicode import VQA_LAYOUTS, check_vqa_layout, image_then_text, question_messages

from . import templates
from .codes import CODES_COLUMN
from .data.shapes import (
    GRID,
    QUESTION_TYPES,
    build_split,
    check_question_count,
    check_reasoned_types,
    check_yes_no_counts,
    position_questions,
    reasoned_answer,
    referred_objects,
    scene_from_json,
    yes_no_questions,
)

TASKS_DECOMPRESS = ("decompress",)
TASKS_SFT = ("caption", "vqa", "text_to_image", "continue_image")
IGNORE_INDEX = -100


def _text(text: str) -> dict:
    return {"type": "text", "text": text, "start": None, "end": None}


def _item(kind: str, start: Optional[int] = None, end: Optional[int] = None) -> dict:
    return {"type": kind, "text": None, "start": start, "end": end}


def grounding_item(groups: Sequence[Sequence[int]]) -> dict:
    """An assistant turn's annotation (it renders no tokens): the cells (row * GRID + column of the Shapes world's
    grid) its answer is read from, one group per attention head that `grounded_attention` trains to look at them
    ("2|4": head 0 at cell 2, head 1 at cell 4)."""
    return {**_item("grounding"), "text": "|".join(" ".join(str(int(c)) for c in cells) for cells in groups)}


def _turn(role: str, *items: dict) -> dict:
    return {"role": role, "content": list(items)}


def _row_turn(message: dict) -> dict:
    """A chat message of the processor's (`question_messages`, `image_then_text`) in the rows' schema."""
    return _turn(message["role"], *({**_item(part["type"]), **part} for part in message["content"]))


def image_then(text: str) -> dict:
    """The user turn that shows the image and asks about it, in the processor's layout (`image_then_text`, shipped
    with every exported model), its items in the rows' schema. Every task that reads an image opens this way, and so
    do the evaluation's prompts."""
    return _row_turn({"role": "user", "content": image_then_text(text)})


def vqa_opening(question_prompt: str, vqa_layout: str = "image_first", description: Optional[str] = None):
    """The messages of a VQA conversation up to its first answer in `vqa_layout`, in the rows' schema: the
    processor's layouts (`question_messages`, the one definition, which evaluation's prompts use too).
    `description` (the caption turn's text) is needed by, and only by, "describe_first"."""
    return [_row_turn(message) for message in question_messages(question_prompt, vqa_layout, description)]


def segment_bounds(num_codes: int, depth: int, segments: int) -> list[int]:
    """T+1 cut points of a flattened code sequence, on position boundaries (a position's D codes
    stay in one segment, so every segment is whole positions)."""
    if num_codes % depth:
        raise ValueError(f"num_codes={num_codes} is not a multiple of depth={depth}")
    positions = num_codes // depth
    if not 1 <= segments <= positions:
        raise ValueError(f"segments={segments} must be between 1 and the {positions} code positions of an image")
    return [round(i * positions / segments) * depth for i in range(segments + 1)]


def _rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, salt])


def _require(dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the {what} builder needs columns {list(columns)} but the dataset lacks {missing} (it has "
            f"{dataset.column_names}); build a code dataset with training.codes.encode_image_dataset on a dataset "
            "with those columns (the Shapes world has captions and questions)"
        )


def task_features():
    """Arrow schema of task rows, fixed so datasets of different tasks concatenate."""

    item = {
        "type": datasets.Value("string"),
        "text": datasets.Value("string"),
        "start": datasets.Value("int64"),
        "end": datasets.Value("int64"),
    }
    return datasets.Features(
        {
            "task": datasets.Value("string"),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(item)}),
            CODES_COLUMN: datasets.List(datasets.Value("int32")),
        }
    )


def _build(dataset, rows_of, columns: Sequence[str], what: str, seed: int):
    _require(dataset, columns, what)

    def expand(batch, indices):
        out = {"task": [], "messages": [], CODES_COLUMN: []}
        for offset, index in enumerate(indices):
            row = {c: batch[c][offset] for c in columns}
            for task, messages in rows_of(row, index):
                out["task"].append(task)
                out["messages"].append(messages)
                out[CODES_COLUMN].append(row[CODES_COLUMN])
        return out

    return dataset.map(
        expand,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=task_features(),
        desc=f"{what} tasks",
    )


def _caption_order(rng, count: int, first: int) -> list[int]:
    """Caption `first`, then the image's other captions in a random order: several rows of one image each take
    another of its captions while they last (the caller cycles through the list)."""
    return [first] + [int(c) for c in rng.permutation(count) if c != first]


def decompression_tasks(dataset, depth: int, segments: int = 4, seed: int = 0):
    """The paper's in-context pre-training: the compressed image in, its flattened codes out, as T
    assistant turns (each a segment of whole positions)."""

    def rows_of(row, index):
        rng = _rng(seed, index, 1)
        bounds = segment_bounds(len(row[CODES_COLUMN]), depth, segments)
        first = templates.DECOMPRESS_FIRST[rng.integers(len(templates.DECOMPRESS_FIRST))]
        messages = [image_then(first)]
        for i in range(segments):
            if i:
                messages.append(
                    _turn("user", _text(templates.DECOMPRESS_NEXT[rng.integers(len(templates.DECOMPRESS_NEXT))]))
                )
            messages.append(_turn("assistant", _item("codes", bounds[i], bounds[i + 1])))
        yield "decompress", messages

    return _build(dataset, rows_of, [CODES_COLUMN], "decompression", seed)


def understanding_tasks(
    dataset,
    seed: int = 0,
    questions_per_image: int = 2,
    questions_per_conversation: int = 1,
    captions_per_image: int = 1,
    question_type_weights: Optional[dict[str, float]] = None,
    yes_no_questions_per_image: Optional[dict[str, int]] = None,
    vqa_layout: str = "image_first",
    caption_closes_vqa: bool = False,
    reasoned_answers: Optional[Sequence[str]] = None,
    position_questions_per_image: int = 0,
    reasoned_cells: bool = False,
    grounded_answers: bool = False,
):
    """Captioning (`captions_per_image` rows per image, each a different caption while they last) and VQA
    (`questions_per_image` random questions; with `question_type_weights` a question of type t is drawn, without
    replacement, with odds proportional to its weight, 1 for a type not named).

    `questions_per_conversation` > 1 asks several questions of one image as consecutive turns: the
    image's placeholders are paid for once instead of once per answer, so a step carries several
    times more answer tokens (the image is most of a VQA row's length). The first turn is the
    evaluation's prompt exactly (image, then the question).

    `yes_no_questions_per_image` ({type: n}, Shapes world rows, which carry a `scene`): n more questions of that
    yes/no type per image, drawn from the scene (`shapes.yes_no_questions`), asked after the drawn ones in the same
    conversations.

    `position_questions_per_image` (Shapes world rows): the positions of that many distinct shapes of each image
    (`shapes.position_questions`), asked after the yes/no ones in the same conversations.

    `vqa_layout` (`VQA_LAYOUTS`): where each conversation's first question stands (`vqa_opening`). With
    "describe_first" the opening caption is one of the scene's captions, at random, and is supervised like any
    assistant turn.

    `caption_closes_vqa`: each VQA conversation ends with a caption turn (one of the scene's captions, at random,
    asked with `templates.CAPTION[0]`): more caption supervision in rows the step reads anyway, so the other tasks
    keep their share of the rows, and the questions are asked as before.

    `reasoned_answers` (types of `shapes.REASONED_TYPES`, Shapes world rows): the answers of these types are written
    with their reasoning first (`shapes.reasoned_answer`: "left and right: yes", "square and circle: no"); the
    evaluation scores the words after the last ": " (`shapes.final_answer`). `reasoned_cells`: a reasoned existence
    answer names each shape's cell too ("square top left and triangle center: no").

    `grounded_answers` (Shapes world rows): each answer to a question that names shapes (`shapes.referred_objects`)
    carries their cells (`grounding_item`), for `grounded_attention`."""
    check_vqa_layout(vqa_layout)
    reasoned = set(check_reasoned_types(reasoned_answers))
    if questions_per_image < 0 or questions_per_conversation < 1 or captions_per_image < 0:
        raise ValueError(
            f"questions_per_image={questions_per_image} and captions_per_image={captions_per_image} must be >= 0, "
            f"questions_per_conversation={questions_per_conversation} >= 1"
        )
    weights = dict(question_type_weights or {})
    unknown = sorted(set(weights) - set(QUESTION_TYPES))
    if unknown or any(not w > 0 for w in weights.values()):
        raise ValueError(
            f"question_type_weights={weights} must give positive weights to question types of {list(QUESTION_TYPES)}"
            + (f"; {unknown} are not question types" if unknown else "")
        )

    extra = dict(yes_no_questions_per_image or {})
    try:
        check_yes_no_counts(extra)
    except ValueError as error:
        raise ValueError(f"yes_no_questions_per_image={extra}: {error}") from None
    extra = {kind: int(n) for kind, n in extra.items() if n}
    try:
        check_question_count(position_questions_per_image, "position questions per image")
    except ValueError as error:
        raise ValueError(f"position_questions_per_image: {error}") from None
    needs_scene = bool(extra or reasoned or position_questions_per_image or grounded_answers)

    def rows_of(row, index):
        rng = _rng(seed, index, 2)
        captions = row["captions"]
        if captions and captions_per_image:
            order = [int(rng.integers(len(captions)))]
            if captions_per_image > 1:  # drawn only then, so one caption per image keeps the rows it always had
                order = _caption_order(rng, len(captions), order[0])
            for k in range(captions_per_image):
                prompt = templates.CAPTION[rng.integers(len(templates.CAPTION))]
                caption = captions[order[k % len(order)]]
                yield (
                    "caption",
                    [image_then(prompt), _turn("assistant", _text(caption))],
                )
        questions = list(row["questions"])
        if weights:
            odds = np.array([weights.get(qa["type"], 1.0) for qa in questions])
            count = min(questions_per_image, len(questions))
            picked = rng.choice(len(questions), size=count, replace=False, p=odds / odds.sum())
        else:  # the unweighted draw keeps the rows (and task_rows_sha256) of the recipes before the weights
            picked = rng.permutation(len(questions))[:questions_per_image]
        chosen = [questions[int(q)] for q in picked]
        scene = scene_from_json(row["scene"]) if needs_scene else None  # parsed once for every question of the row
        for kind, count in extra.items():  # a generator of their own, so the rows without them do not change
            chosen += yes_no_questions(scene, kind, count, _rng(seed, index, 4))
        if position_questions_per_image:  # a generator of its own, so the rows without them do not change
            chosen += position_questions(scene, position_questions_per_image, _rng(seed, index, 6))
        closing_rng = _rng(seed, index, 5)
        for start in range(0, len(chosen), questions_per_conversation):
            messages = []
            for qa in chosen[start : start + questions_per_conversation]:
                prompt = templates.VQA[rng.integers(len(templates.VQA))].format(question=qa["question"])
                if messages:
                    messages.append(_turn("user", _text(prompt)))
                elif vqa_layout == "describe_first":  # drawn only then, so the other layouts keep their rows
                    if not captions:
                        raise ValueError(f"row {index} has no captions; vqa_layout='describe_first' opens with one")
                    description = captions[int(rng.integers(len(captions)))]
                    messages += vqa_opening(prompt, vqa_layout, description)
                else:
                    messages += vqa_opening(prompt, vqa_layout)
                answer = reasoned_answer(scene, qa, reasoned_cells) if qa["type"] in reasoned else qa["answer"]
                referred = referred_objects(scene, qa) if grounded_answers else []
                # A relation answer compares two shapes, so each gets a head of its own: one head's average over
                # both would carry their two positions without saying which is whose.
                groups = [[o] for o in referred] if qa["type"] == "relation" else [referred]
                cells = [[o["row"] * GRID + o["col"] for o in group] for group in groups]
                grounding = [grounding_item(cells)] if referred else []
                messages.append(_turn("assistant", *grounding, _text(answer)))
            if caption_closes_vqa:  # a generator of its own, so the questions are drawn as without it
                if not captions:
                    raise ValueError(f"row {index} has no captions; caption_closes_vqa=True ends with one")
                caption = captions[int(closing_rng.integers(len(captions)))]
                messages += [_turn("user", _text(templates.CAPTION[0])), _turn("assistant", _text(caption))]
            yield "vqa", messages

    columns = [CODES_COLUMN, "captions", "questions"] + (["scene"] if needs_scene else [])
    return _build(dataset, rows_of, columns, "understanding", seed)


def generation_tasks(
    dataset, depth: int, segments: int = 4, caption_drop: float = 0.1, seed: int = 0, drawings_per_image: int = 1
):
    """Text-to-image (caption in, `<boi>` codes `<eoi>` out; with probability `caption_drop` the
    caption is "" in the processor's default template — CFG's unconditional prompt) and
    continue-a-partial-image (caption + the first k segments in, segment k+1 out).
    `drawings_per_image`: text-to-image rows per image, each from another of its captions while they last."""
    if not 0.0 <= caption_drop < 1.0:
        raise ValueError(f"caption_drop={caption_drop} must be in [0, 1) (the paper's p, default 0.1)")
    if drawings_per_image < 1:
        raise ValueError(f"drawings_per_image={drawings_per_image} must be >= 1 (text-to-image rows per image)")

    def drawing(rng, caption: str, n: int):
        if rng.random() < caption_drop:
            instruction = templates.TEXT_TO_IMAGE[0].format(caption="")
        else:
            instruction = templates.TEXT_TO_IMAGE[rng.integers(len(templates.TEXT_TO_IMAGE))].format(caption=caption)
        return (
            "text_to_image",
            [
                _turn("user", _text(instruction)),
                _turn("assistant", _item("boi"), _item("codes", 0, n), _item("eoi")),
            ],
        )

    def rows_of(row, index):
        rng = _rng(seed, index, 3)
        captions = row["captions"]
        if not captions:
            return
        first = int(rng.integers(len(captions)))
        caption = captions[first]
        n = len(row[CODES_COLUMN])
        yield drawing(rng, caption, n)
        if segments > 1:
            bounds = segment_bounds(n, depth, segments)
            k = int(rng.integers(1, segments))
            prompt = templates.CONTINUE_IMAGE[rng.integers(len(templates.CONTINUE_IMAGE))].format(caption=caption)
            yield (
                "continue_image",
                [
                    _turn("user", _text(prompt), _item("codes", 0, bounds[k])),
                    _turn("assistant", _item("codes", bounds[k], bounds[k + 1])),
                ],
            )
        if drawings_per_image > 1:  # drawn only then, so one drawing per image keeps the rows it always had
            order = _caption_order(rng, len(captions), first)
            for k in range(1, drawings_per_image):
                yield drawing(rng, captions[order[k % len(order)]], n)

    return _build(dataset, rows_of, [CODES_COLUMN, "captions"], "generation", seed)


def task_rows_fingerprint(num_examples: int = 4) -> str:
    """A short sha256 of the conversations the stage-II task builders make (templates, sampling, turn
    layout) from the first Shapes examples with stand-in codes. Like `shapes_world_fingerprint`, a run
    folder records it so stage-II models trained on rows an older version built are not silently reused."""

    depth, positions = 2, 8
    examples = build_split("train", num_examples).remove_columns(["image"])
    examples = examples.add_column(CODES_COLUMN, [list(range(depth * positions))] * num_examples)
    digest = hashlib.sha256()
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # three bars over 4 rows would only clutter the demo's output
    try:
        for rows in (
            decompression_tasks(examples, depth),
            understanding_tasks(examples),
            generation_tasks(examples, depth),
        ):
            digest.update(json.dumps(rows.to_dict(), sort_keys=True).encode())
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return digest.hexdigest()[:16]


def split_by_task(dataset) -> dict[str, Any]:
    """{task: rows of that task}, for per-task held-out losses."""
    tasks = sorted(set(dataset["task"]))
    return {task: dataset.filter(lambda t, task=task: t == task, input_columns="task") for task in tasks}


# -- tokenization --------------------------------------------------------------------------------

_SENTINEL = "\u0001{}\u0001"


class ConversationTokenizer:
    """Turns task rows into `input_ids`, `labels` (-100 outside assistant turns) and `image_codes`
    (the row's codes when it has an `{"type": "image"}` input, else [])."""

    def __init__(self, processor, grounding: bool = False):
        self.grounding = grounding
        if not hasattr(processor, "apply_chat_template") or not hasattr(processor, "num_image_tokens"):
            raise TypeError(f"processor must be a UniCodeProcessor, got {type(processor).__name__}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        ids = self.tokenizer.convert_tokens_to_ids
        self.image_id, self.boi_id, self.eoi_id = ids(IMAGE_TOKEN), ids(BOI_TOKEN), ids(EOI_TOKEN)
        self.num_image_tokens = processor.num_image_tokens
        # Whatever the tokenizer puts in front of a prompt (BOS for Llama, nothing for stage 0):
        # the processor tokenizes the whole prompt with special tokens at inference.
        self.prefix = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        with_prompt = processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        self.generation_prompt = with_prompt[len(processor.apply_chat_template(probe, tokenize=False)) :]

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _render(self, message: dict, codes: Sequence[int]) -> tuple[str, list[list[int]]]:
        """The turn as chat-template text with a sentinel per non-text item, and those items' ids."""

        parts, spliced = [], []
        for item in message["content"]:
            kind = item["type"]
            if kind == "text":
                parts.append({"type": "text", "text": item["text"]})
                continue
            if kind == "image":
                chunk = [self.image_id] * self.num_image_tokens
            elif kind == "codes":
                chunk = [int(c) for c in codes[item["start"] : item["end"]]]
            elif kind in ("boi", "eoi"):
                chunk = [self.boi_id if kind == "boi" else self.eoi_id]
            else:
                raise ValueError(f"unknown content type {kind!r}; use text, image, codes, boi or eoi")
            parts.append({"type": "text", "text": _SENTINEL.format(len(spliced))})
            spliced.append(chunk)
        rendered = self.processor.apply_chat_template([{"role": message["role"], "content": parts}], tokenize=False)
        if IMAGE_TOKEN in rendered:
            raise ValueError("a text item contains <image>; use a {'type': 'image'} item for the input image")
        return rendered, spliced

    def _pieces(self, text: str, spliced: list[list[int]]) -> list[int]:
        ids = []
        for i, chunk in enumerate(spliced):
            head, text = text.split(_SENTINEL.format(i), 1)
            ids += self._encode_text(head) + chunk
        return ids + self._encode_text(text)

    def __call__(self, messages: list[dict], codes: Sequence[int]) -> dict[str, list[int]]:
        input_ids, labels = list(self.prefix), [IGNORE_INDEX] * len(self.prefix)
        has_image = False
        grounded_positions, grounded_heads, grounded_cells = [], [], []
        for message in messages:
            cells = [item["text"] for item in message["content"] if item["type"] == "grounding"]
            if cells:
                message = {**message, "content": [item for item in message["content"] if item["type"] != "grounding"]}
            role = message["role"]
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"message role {role!r} is not one of system, user, assistant")
            has_image |= any(item["type"] == "image" for item in message["content"])
            text, spliced = self._render(message, codes)
            if role != "assistant":
                ids = self._pieces(text, spliced)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
                continue
            if not text.startswith(self.generation_prompt):
                raise ValueError("the chat template's assistant turn does not start with its generation prompt")
            answer = text[len(self.generation_prompt) :]
            # An image answer follows the generation prompt directly: image-mode generate appends
            # <boi> right after it, with no space token in between.
            if message["content"] and message["content"][0]["type"] != "text" and answer.startswith(" "):
                answer = answer[1:]
            prompt_ids = self._encode_text(self.generation_prompt)
            answer_ids = self._pieces(answer, spliced)
            for text in cells:  # each head's cells, at the position whose output predicts the answer's first token
                for head, group in enumerate(text.split("|")):
                    grounded_positions.append(len(input_ids) + len(prompt_ids) - 1)
                    grounded_heads.append(head)
                    grounded_cells.append(sum(1 << int(c) for c in group.split()))
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        if has_image and sum(1 for i in input_ids if i == self.image_id) != self.num_image_tokens:
            raise ValueError("a conversation may hold one input image (one {'type': 'image'} item)")
        out = {"input_ids": input_ids, "labels": labels, "image_codes": list(codes) if has_image else []}
        if self.grounding:  # the answers' query positions, heads and cells as bit masks (`grounding_item`)
            out.update(
                grounding_positions=grounded_positions, grounding_heads=grounded_heads, grounding_cells=grounded_cells
            )
        return out


def tokenize_tasks(
    dataset,
    processor,
    max_length: Optional[int] = None,
    desc: str = "tokenizing conversations",
    grounding: bool = False,
):
    """Task rows -> `input_ids`, `labels`, `image_codes` (plus `task`). Rows longer than `max_length`
    are an error, not silently cut: a cut image span could not be decoded."""
    _require(dataset, ["messages", CODES_COLUMN], "tokenization")
    tokenizer = ConversationTokenizer(processor, grounding)

    def encode(row):
        out = tokenizer(row["messages"], row[CODES_COLUMN])
        if max_length is not None and len(out["input_ids"]) > max_length:
            raise ValueError(
                f"a {row.get('task', '')} conversation is {len(out['input_ids'])} tokens, above "
                f"max_length={max_length}; "
                "raise max_length (the LLM's context allows text_config.max_position_embeddings) or use more segments"
            )
        return out

    keep = {"task"} & set(dataset.column_names)
    return dataset.map(encode, remove_columns=[c for c in dataset.column_names if c not in keep], desc=desc)


__all__ = [
    "TASKS_DECOMPRESS",
    "TASKS_SFT",
    "VQA_LAYOUTS",
    "image_then",
    "vqa_opening",
    "segment_bounds",
    "decompression_tasks",
    "understanding_tasks",
    "generation_tasks",
    "split_by_task",
    "task_rows_fingerprint",
    "ConversationTokenizer",
    "tokenize_tasks",
]
