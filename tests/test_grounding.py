"""Grounded attention (`grounded_attention`): the rows say which cells each answer is read from, the term recomputes
the last layer's attention exactly, and the step it adds is the same whole or split by length."""

import copy
import math

import datasets
import pytest
import torch
from peft import get_peft_model
from stage2_fixtures import shapes_at
from utils_mllm import tiny_mllm

from training.codes import encode_image_dataset
from training.data.shapes import GRID, build_split, referred_objects, scene_from_json
from training.grounding import (
    attention_layer,
    captured_attention_input,
    grounding_loss,
    head_attention,
    placeholder_cells,
)
from training.sft import CodesCollator, unicode_lora_config
from training.tasks import IGNORE_INDEX, tokenize_tasks, understanding_tasks


@pytest.fixture(scope="module")
def mllm():
    return tiny_mllm()


@pytest.fixture(scope="module")
def codes(mllm):
    model, _ = mllm
    return encode_image_dataset(shapes_at(16, 12), model, batch_size=12)


def _grounded_rows(codes, **kwargs):
    return understanding_tasks(
        codes, questions_per_image=8, questions_per_conversation=8, grounded_answers=True, **kwargs
    )


def test_referred_objects_are_the_shapes_a_question_names():
    """Colour and shape questions are about the shape in a named cell, position and size about a named shape,
    relation about two, existence about the shapes of a colour; counts about no one shape."""
    seen = set()
    for row in build_split("train", 30):
        scene = scene_from_json(row["scene"])
        for qa in row["questions"]:
            referred = referred_objects(scene, qa)
            seen.add(qa["type"])
            words = qa["question"].rstrip("?").split()
            if qa["type"] in ("position", "size"):
                colour, shape = (words[-2], words[-1]) if qa["type"] == "position" else (words[2], words[3])
                assert [(o["color"], o["shape"]) for o in referred] == [(colour, shape)]
            elif qa["type"] == "relation":
                assert [(o["color"], o["shape"]) for o in referred] == [(words[2], words[3]), (words[-2], words[-1])]
                assert referred[0]["col"] != referred[1]["col"]
            elif qa["type"] == "existence":
                assert referred == [o for o in scene["objects"] if o["color"] == words[-2]]
            elif qa["type"] in ("color", "shape"):  # the shape in the named cell
                (target,) = referred
                assert qa["question"].endswith(f"in the {target['position']}?")
                assert qa["type"] == "shape" or f"the {target['shape']} in" in qa["question"]
            else:
                assert referred == []
    assert seen >= {"position", "size", "relation", "existence", "color", "shape", "count"}


def test_grounded_rows_keep_their_conversations_and_mark_each_named_answer(codes):
    """`grounded_answers`: the same conversations, each answer that names shapes annotated with their cells."""
    plain = understanding_tasks(codes, questions_per_image=8, questions_per_conversation=8)
    grounded = _grounded_rows(codes)
    annotated = 0
    for bare, marked, row in zip(plain, grounded, [r for r in codes for _ in (0, 1)]):
        turns = marked["messages"]
        stripped = [{**m, "content": [i for i in m["content"] if i["type"] != "grounding"]} for m in turns]
        assert stripped == bare["messages"]
        if marked["task"] != "vqa":
            continue
        scene = scene_from_json(row["scene"])
        for question, answer in zip(turns[::2], turns[1::2]):
            qa = next(q for q in row["questions"] if q["question"] in question["content"][-1]["text"])
            cells = [item["text"] for item in answer["content"] if item["type"] == "grounding"]
            referred = [o["row"] * GRID + o["col"] for o in referred_objects(scene, qa)]
            groups = [[c] for c in referred] if qa["type"] == "relation" else [referred]  # a head per compared shape
            assert cells == (["|".join(" ".join(map(str, group)) for group in groups)] if referred else [])
            annotated += bool(cells)
    assert annotated > 0


def test_tokenized_grounding_points_at_the_position_that_predicts_the_answer(mllm, codes):
    model, processor = mllm
    grounded = _grounded_rows(codes).filter(lambda task: task == "vqa", input_columns="task")
    rows = tokenize_tasks(grounded, processor, grounding=True)
    plain = tokenize_tasks(grounded, processor)
    checked = 0
    for row, bare, messages in zip(rows, plain, grounded["messages"]):
        assert row["input_ids"] == bare["input_ids"] and row["labels"] == bare["labels"]  # nothing rendered
        groups = [
            (head, sum(1 << int(c) for c in group.split()))
            for m in messages
            for item in m["content"]
            if item["type"] == "grounding"
            for head, group in enumerate(item["text"].split("|"))
        ]
        assert list(zip(row["grounding_heads"], row["grounding_cells"])) == groups
        answers = [i for i in range(1, len(row["labels"])) if row["labels"][i] != IGNORE_INDEX]
        starts = {i for i in answers if row["labels"][i - 1] == IGNORE_INDEX}  # each answer's first token
        for position in row["grounding_positions"]:
            assert row["labels"][position] == IGNORE_INDEX and position + 1 in starts
            checked += 1
    assert checked > 0
    assert "grounding_positions" not in plain.column_names


def test_placeholder_cells_follow_the_image_layout():
    model, _ = tiny_mllm(visual_input="flatten")  # 4 x 4 codes, two levels each
    cells = placeholder_cells(model.config, 3).view(4, 4, 2)
    assert torch.equal(cells[..., 0], cells[..., 1])  # a position's levels lie in one cell
    assert cells[..., 0].tolist() == [[0, 1, 1, 2], [3, 4, 4, 5], [3, 4, 4, 5], [6, 7, 7, 8]]


def _grounded_batch(mllm, codes):
    model, processor = mllm
    grounded = _grounded_rows(codes.select(range(6)), reasoned_answers=["existence"])
    rows = tokenize_tasks(grounded, processor, grounding=True)
    return CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])


def test_recomputed_head_attention_is_the_layers_own(mllm, codes):
    """The term reads the attention probabilities the last layer really computes, padding and causality included."""
    model = copy.deepcopy(mllm[0])
    model.set_attn_implementation("eager")  # the only one that returns its probabilities
    batch = _grounded_batch(mllm, codes)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: right padding is masked
    layer = attention_layer(model)
    with torch.no_grad(), captured_attention_input(layer) as seen:
        out = model(**{k: v for k, v in batch.items() if not k.startswith("grounding")}, output_attentions=True)
    rows, slots = (batch["grounding_positions"] >= 0).nonzero(as_tuple=True)
    positions = batch["grounding_positions"][rows, slots]
    for head in range(model.config.text_config.num_attention_heads):
        ours = head_attention(layer, seen, head, rows, positions, batch["attention_mask"])
        theirs = out.attentions[-1][rows, head, positions]
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-6)


def test_grounding_loss_is_minus_log_each_heads_mass_on_its_named_cells(mllm, codes):
    """ "assigned": each group's head (relation: one per shape); "any": the head looking at the group's cells most."""
    model, _ = mllm
    batch = _grounded_batch(mllm, codes)
    layer = attention_layer(model)
    with torch.no_grad(), captured_attention_input(layer) as seen:
        model(**{k: v for k, v in batch.items() if not k.startswith("grounding")})
    cells = placeholder_cells(model.config, GRID)
    image_token_id = model.config.image_token_id
    total, count = grounding_loss(layer, seen, batch, cells, image_token_id)
    best, _ = grounding_loss(layer, seen, batch, cells, image_token_id, heads="any")
    rows, slots = (batch["grounding_positions"] >= 0).nonzero(as_tuple=True)
    assert count == len(rows) > 0 and set(batch["grounding_heads"][rows, slots].tolist()) == {0, 1}  # relation: two
    expected = expected_best = 0.0
    for row, slot in zip(rows.tolist(), slots.tolist()):
        placeholders = (batch["input_ids"][row] == image_token_id).nonzero().flatten()
        mask = int(batch["grounding_cells"][row, slot])
        named = [int(p) for k, p in enumerate(placeholders) if mask >> int(cells[k]) & 1]
        assert named  # every grounded answer names a shape of the scene, which lies under some placeholder
        position, padding = batch["grounding_positions"][row, slot : slot + 1], batch["attention_mask"]
        with torch.no_grad():
            heads = [head_attention(layer, seen, h, torch.tensor([row]), position, padding) for h in (0, 1)]
        masses = [float(probabilities[0, named].sum()) for probabilities in heads]
        expected -= math.log(masses[int(batch["grounding_heads"][row, slot])])
        expected_best -= math.log(max(masses))
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(best) == pytest.approx(expected_best, rel=1e-5) and float(best) < float(total)
    too_many = {**batch, "grounding_heads": batch["grounding_heads"] + 2}
    with pytest.raises(ValueError, match="asks for head 2; the last layer has 2"):
        grounding_loss(layer, seen, too_many, cells, image_token_id)
    with pytest.raises(ValueError, match="grounding_heads='every' is not one of"):
        grounding_loss(layer, seen, batch, cells, image_token_id, heads="every")


@pytest.mark.parametrize("normalization", ["token", "row"])
def test_grounded_attention_adds_its_term_and_splits_like_the_answers(mllm, codes, tmp_path, normalization):
    """`grounded_attention`: the loss is the answers' plus weight x the mean grounding term, whole or split by length
    (the same loss and gradients), and a step on it moves the last layer's queries and keys."""
    from training.sft import _sft_trainer_class, add_labelled_positions_lm_head, unicode_sft_config

    model, processor = mllm
    model.save_pretrained(tmp_path / "base")
    model = type(model).from_pretrained(tmp_path / "base")
    batch = _grounded_batch(mllm, codes)
    rows = datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]})
    results = {}
    for weight, split in ((0.0, False), (0.5, False), (0.5, True)):
        trainer = _sft_trainer_class()(
            model=model,
            args=unicode_sft_config(tmp_path / f"{weight}-{split}", max_steps=1),
            train_dataset=rows,
            data_collator=CodesCollator(processor.tokenizer.pad_token_id),
            processing_class=processor,
            loss_normalization=normalization,
            length_split=split,
            grounded_attention=weight,
        )
        add_labelled_positions_lm_head(trainer.model)
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[weight, split] = (float(loss.detach()), grads, trainer._metrics["train"].get("grounding_loss"))
    (plain, plain_grads, none), (whole, whole_grads, logged), (split, split_grads, _) = results.values()
    assert none is None and len(logged) == 1
    assert whole == pytest.approx(plain + 0.5 * logged[0], rel=1e-5)
    assert split == pytest.approx(whole, rel=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grad, split_grads[name], rtol=1e-4, atol=1e-6)
    keys = [n for n in whole_grads if n.endswith("self_attn.k_proj.weight")]
    assert keys and not torch.allclose(whole_grads[keys[-1]], plain_grads[keys[-1]])


def test_grounded_attention_refuses_lora(mllm):
    model, _ = mllm
    wrapped = get_peft_model(copy.deepcopy(model), unicode_lora_config(model, r=2, alpha=4))
    with pytest.raises(ValueError, match="lora: false"):
        attention_layer(wrapped)
