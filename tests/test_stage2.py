"""Stage II: code datasets, task conversations, LoRA SFT that lowers every task's held-out loss,
merge == adapter, atomic checkpoints and resume, clear errors."""

import copy
import json
import math

import datasets
import pytest
import torch
from peft import get_peft_model
from stage2_fixtures import shapes_at
from transformers import Trainer
from utils_mllm import random_images, tiny_mllm

from training import templates
from training.codes import CODES_COLUMN, check_code_dataset, code_signature, encode_image_dataset
from training.sft import (
    CodesCollator,
    image_special_token_ids,
    last_complete_checkpoint,
    merge_adapter,
    unicode_lora_config,
)
from training.stage2 import _use_axial_positions, run_sft
from training.tasks import (
    IGNORE_INDEX,
    VQA_LAYOUTS,
    ConversationTokenizer,
    decompression_tasks,
    generation_tasks,
    segment_bounds,
    split_by_task,
    tokenize_tasks,
    understanding_tasks,
)


@pytest.fixture(scope="module")
def mllm():
    return tiny_mllm(tie=True)  # tied like the presets' stage-0 LLMs: PEFT then wraps the LM head too


@pytest.fixture(scope="module")
def codes(mllm):
    model, _ = mllm
    return encode_image_dataset(shapes_at(16, 48), model, batch_size=16), encode_image_dataset(
        shapes_at(16, 12, "validation"), model
    )


def sft_rows(codes_ds, model, processor, seed=0):
    depth = model.config.vq_config.depth
    rows = datasets.concatenate_datasets(
        [
            decompression_tasks(codes_ds, depth, segments=2, seed=seed),
            understanding_tasks(codes_ds, seed=seed),
            generation_tasks(codes_ds, depth, segments=2, seed=seed),
        ]
    )
    return tokenize_tasks(rows, processor)


def test_code_dataset_holds_the_models_codes_and_refuses_another_tokenizer(mllm, codes):
    model, _ = mllm
    train, _ = codes
    assert "image" not in train.column_names
    row = torch.tensor(train[0][CODES_COLUMN])
    pixels = torch.from_numpy(__import__("numpy").array(shapes_at(16, 1)[0]["image"].convert("RGB"))).permute(2, 0, 1)
    expected = model.model.encode_images((pixels.float() / 127.5 - 1).unsqueeze(0)).reshape(-1)
    assert torch.equal(row, expected)
    check_code_dataset(train, model)  # same tokenizer: accepted
    other, _ = tiny_mllm(seed=3)
    with pytest.raises(ValueError, match="different visual tokenizer"):
        check_code_dataset(train, other)
    signature = code_signature(model)
    with pytest.raises(ValueError, match="codebook_size"):
        check_code_dataset(train, {**signature, "codebook_size": 99})
    with pytest.raises(ValueError, match="no 'codes' column"):
        check_code_dataset(train.remove_columns(CODES_COLUMN), model)
    with pytest.raises(ValueError, match="no 'picture' column"):
        encode_image_dataset(shapes_at(16, 2), model, image_column="picture")


def test_tasks_match_the_processor_and_train_only_the_answers(mllm, codes):
    model, processor = mllm
    train, _ = codes
    depth = model.config.vq_config.depth
    n = model.config.image_tokens_per_generation
    row_codes = train[0][CODES_COLUMN]
    assert len(templates.TEXT_TO_IMAGE) >= 8
    assert segment_bounds(n, depth, 3)[-1] == n and all(b % depth == 0 for b in segment_bounds(n, depth, 3))

    decompress = tokenize_tasks(decompression_tasks(train.select([0]), depth, segments=4), processor)[0]
    answers = [t for t, lab in zip(decompress["input_ids"], decompress["labels"]) if lab != IGNORE_INDEX]
    eos = processor.tokenizer.eos_token_id
    assert [
        t for t in answers if t != eos and t not in processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    ] == row_codes
    assert decompress["image_codes"] == row_codes
    assert decompress["input_ids"].count(processor.image_token_id) == processor.num_image_tokens

    # Every caption dropped: the prompt is exactly CFG's unconditional prompt from the processor.
    t2i = tokenize_tasks(generation_tasks(train.select([0]), depth, segments=2, caption_drop=0.999), processor)
    t2i = [r for r in t2i if r["task"] == "text_to_image"][0]
    unconditional = processor(text="a red circle", generation_mode="image")["unconditional_input_ids"][0].tolist()
    assert t2i["input_ids"][: len(unconditional)] == unconditional
    assert t2i["input_ids"][len(unconditional)] == processor.boi_token_id
    assert t2i["input_ids"][len(unconditional) + 1 : len(unconditional) + 1 + n] == row_codes
    assert t2i["input_ids"][len(unconditional) + 1 + n] == processor.eoi_token_id
    assert all(lab == IGNORE_INDEX for lab in t2i["labels"][: len(unconditional)])
    assert t2i["image_codes"] == []  # generation reads no input image

    vqa = [r for r in tokenize_tasks(understanding_tasks(train.select([0])), processor) if r["task"] == "vqa"][0]
    prompt_len = vqa["labels"].index(next(lab for lab in vqa["labels"] if lab != IGNORE_INDEX))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + "x"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).endswith("ASSISTANT:")
    assert processor.tokenizer.decode(vqa["input_ids"][prompt_len:]).strip().endswith(processor.tokenizer.eos_token)

    batch = CodesCollator(processor.tokenizer.pad_token_id)([decompress, t2i])
    assert batch["image_codes"].shape == (1, n)  # only the row with an input image contributes codes
    assert batch["labels"][1, len(t2i["labels"]) :].eq(IGNORE_INDEX).all()


def test_bad_input_is_named(mllm, codes):
    model, processor = mllm
    train, _ = codes
    with pytest.raises(ValueError, match=r"lacks \['questions'\]"):
        understanding_tasks(train.remove_columns("questions"))
    with pytest.raises(ValueError, match="lacks"):
        tokenize_tasks(train, processor)
    with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] are not linear layers.*q_proj"):
        unicode_lora_config(model, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="caption_drop"):
        generation_tasks(train, 2, caption_drop=1.5)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        run_sft(model, processor, train, "/nonexistent")
    with pytest.raises(TypeError, match="UniCodeProcessor"):
        ConversationTokenizer(processor.tokenizer)


@pytest.fixture(scope="module")
def trained(mllm, codes, tmp_path_factory):
    model, processor = mllm
    train, validation = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path_factory.mktemp("base")))
    held_out = split_by_task(sft_rows(validation, model, processor, seed=1))
    codebook = model.model.codebook().detach().clone()
    out = tmp_path_factory.mktemp("sft")
    trainer, metrics = run_sft(
        model,
        processor,
        sft_rows(train, model, processor),
        out / "trainer",
        held_out,
        lora={"r": 8},
        max_steps=150,
        learning_rate=5e-3,
        save_steps=75,
        logging_steps=75,
        per_device_train_batch_size=8,
    )
    return trainer, metrics, out, held_out, codebook


def _save(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_sft_lowers_the_held_out_loss_of_every_task_and_keeps_the_codebook(trained):
    trainer, metrics, out, _, codebook = trained
    assert set(metrics["before"]) == {"decompress", "caption", "vqa", "text_to_image", "continue_image"}
    for task, before in metrics["before"].items():
        assert metrics["after"][task] < before - 0.05, (task, before, metrics["after"][task])
    model = trainer.model
    assert torch.equal(model.get_base_model().model.codebook().detach(), codebook)  # unified codebook untouched
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert not any("vision_tokenizer" in n or "lm_head.weight" in n for n in trainable)
    assert last_complete_checkpoint(out / "trainer").name == "checkpoint-150"
    assert (out / "trainer" / "checkpoint-75" / "COMPLETE").is_file()


def test_adapter_reloads_and_merge_gives_the_same_logits(trained, mllm, codes, tmp_path):
    from peft import PeftModel

    from training.sft import load_unicode_model
    from training.stage2 import save_adapter

    trainer, _, _, held_out, _ = trained
    _, processor = mllm
    base_dir = trainer.model.get_base_model().name_or_path
    adapter = save_adapter(trainer, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(load_unicode_model(base_dir), str(adapter)).eval()
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base_dir)
    merged = load_unicode_model(merged_dir).eval()
    rows = [held_out["decompress"][0], held_out["text_to_image"][0]]
    batch = CodesCollator(processor.tokenizer.pad_token_id)(rows)
    batch.pop("labels")
    with torch.no_grad():
        a, b = reloaded(**batch).logits, merged(**batch).logits
    assert (a - b).abs().max().item() < 1e-5
    assert torch.equal(merged.model.codebook(), reloaded.get_base_model().model.codebook())
    trained_model = trainer.model.eval()
    with torch.no_grad():
        assert (trained_model(**batch).logits - a).abs().max().item() < 1e-5


def test_cpu_lm_head_scores_only_the_labelled_positions_with_the_models_own_loss(mllm, codes):
    """On CPU TRL's fused head scored every position through the vocabulary (60 % of a tiny-preset
    step); the replacement must give the model's own loss and gradients while projecting only the
    positions that carry a label."""
    from training.sft import add_labelled_positions_lm_head

    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, __import__("tempfile").mkdtemp())).train()
    rows = sft_rows(train.select(range(2)), model, processor)
    batch = CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    reference = model(**batch).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    add_labelled_positions_lm_head(model)
    projected = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: projected.append(args[0].shape[0]))
    out = model(**batch, fused_lm_head=True)
    hook.remove()
    out.loss.backward()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert projected == [labelled] and labelled < batch["labels"].numel() // 2
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert out.label_mask.sum() == labelled and out.is_top1.shape == out.log_probs.shape == out.label_mask.shape
    for name, grad in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4), name
    plain = model(**{k: v for k, v in batch.items() if k != "labels"})  # generation's forward is untouched
    assert plain.logits.shape[:2] == batch["input_ids"].shape


def test_code_rows_loss_scores_a_drawn_images_codes_over_the_code_rows_only(mllm, codes):
    """`code_logits="code_rows"`: inside a written image generation only samples codes, so there the loss is the
    softmax over the K code rows (no vocabulary-wide projection); every other labelled token keeps the full one."""
    from training.sft import add_labelled_positions_lm_head

    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, __import__("tempfile").mkdtemp())).eval()
    rows = sft_rows(train.select(range(2)), model, processor)
    batch = CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    labels, inputs = batch["labels"][:, 1:], batch["input_ids"][:, :-1]
    code_ids = torch.as_tensor(model.config.vq_config.codebook_token_ids)
    total, count, in_image = 0.0, 0, 0
    for b, t in (labels != IGNORE_INDEX).nonzero().tolist():
        seen = inputs[b, : t + 1].tolist()
        last = {token: max((i for i, x in enumerate(seen) if x == token), default=-1) for token in set(seen)}
        opened = last.get(processor.boi_token_id, -1) > last.get(processor.eoi_token_id, -1)
        if opened and int(labels[b, t]) in code_ids.tolist():
            total += float(logits[b, t, code_ids].log_softmax(-1)[code_ids.tolist().index(int(labels[b, t]))])
            in_image += 1
        else:
            total += float(logits[b, t].log_softmax(-1)[labels[b, t]])
        count += 1
    assert in_image > 0 and count > in_image  # the rows hold a drawn image and text answers

    add_labelled_positions_lm_head(model, "code_rows")
    projected = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: projected.append(args[0].shape[0]))
    with torch.no_grad():
        out = model(**batch, fused_lm_head=True)
    hook.remove()
    assert projected == [count - in_image]
    assert out.loss.item() == pytest.approx(-total / count, rel=1e-5)
    with pytest.raises(ValueError, match="code_logits='codes' is not one of"):
        add_labelled_positions_lm_head(model, "codes")


def test_full_finetune_trains_the_decoder_and_leaves_the_codebook_bit_identical(mllm, codes, tmp_path):
    model, processor = mllm
    train, validation = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))
    codebook = model.model.codebook().detach().clone()
    embedding = model.get_input_embeddings().weight
    special = [processor.image_token_id, processor.boi_token_id, processor.eoi_token_id]
    rows_before = embedding.detach()[special].clone()
    decoder_before = {
        n: p.detach().clone() for n, p in model.model.language_model.named_parameters() if "embed" not in n
    }
    held_out = split_by_task(sft_rows(validation, model, processor, seed=1))
    trainer, metrics = run_sft(
        model,
        processor,
        sft_rows(train, model, processor),
        tmp_path / "trainer",
        held_out,
        lora=False,
        max_steps=40,
        learning_rate=3e-3,
        save_steps=1000,
        logging_steps=40,
    )
    trained = trainer.model
    assert not hasattr(trained, "peft_config")
    assert torch.equal(trained.model.codebook().detach(), codebook)  # unified codebook untouched
    assert not torch.equal(trained.get_input_embeddings().weight.detach()[special], rows_before)
    changed = [
        n
        for n, p in trained.model.language_model.named_parameters()
        if n in decoder_before and not torch.equal(p.detach(), decoder_before[n])
    ]
    assert set(changed) == set(decoder_before)
    assert not any(p.requires_grad for p in trained.model.vision_tokenizer.parameters())
    assert metrics["after"]["vqa"] < metrics["before"]["vqa"]


@pytest.mark.parametrize("vqa_layout", VQA_LAYOUTS)
def test_several_questions_per_conversation_start_with_the_evaluation_prompt(mllm, codes, vqa_layout):
    from training.evaluation import vqa_prompt

    model, processor = mllm
    train, _ = codes
    row = train[0]
    asked = {"questions_per_image": 8, "questions_per_conversation": 8, "vqa_layout": vqa_layout}
    rows = tokenize_tasks(understanding_tasks(train.select([0]), **asked), processor)
    vqa = [r for r in rows if r["task"] == "vqa"]
    assert len(vqa) == 1 and vqa[0]["input_ids"].count(processor.image_token_id) == processor.num_image_tokens
    ids, labels = vqa[0]["input_ids"], vqa[0]["labels"]
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    messages = [t for t in understanding_tasks(train.select([0]), **asked) if t["task"] == "vqa"][0]["messages"]
    describes = vqa_layout == "describe_first"
    # the first question's prompt: what evaluation asks a model trained this way, to the token
    question_turn = messages[2] if describes else messages[0]
    first_question = [item for item in question_turn["content"] if item["type"] == "text"][0]["text"].strip()
    description = messages[1]["content"][0]["text"] if describes else None
    if describes:
        assert description in row["captions"]  # the opening turn is one of the scene's own captions
    first_answer = starts[1] if describes else starts[0]
    image = shapes_at(16, 1)[0]["image"]
    prompt = processor(text=vqa_prompt(processor, first_question, vqa_layout, description), images=[image])
    assert ids[:first_answer] == prompt["input_ids"][0].tolist()
    image_first = processor(text=vqa_prompt(processor, first_question), images=[image])
    text_before_image = ids.index(processor.image_token_id) - image_first["input_ids"][0].tolist().index(
        processor.image_token_id
    )
    assert (text_before_image > 0) == (vqa_layout == "question_first")  # the question moved in front of the image
    tokenizer = processor.tokenizer
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).split()  # noqa: E731
    answers = decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    expected = " ".join(m["content"][0]["text"] for m in messages if m["role"] == "assistant")
    assert answers == decode(tokenizer(expected, add_special_tokens=False)["input_ids"])
    turns = len(row["questions"]) + describes  # one answer per question, and the caption that opens the talk
    assert len(starts) == turns and len(messages) == 2 * turns
    with pytest.raises(ValueError, match="questions_per_conversation=0"):
        understanding_tasks(train, questions_per_conversation=0)
    with pytest.raises(ValueError, match="vqa_layout='caption_first'.*describe_first"):
        understanding_tasks(train, vqa_layout="caption_first")


def test_caption_closes_vqa_appends_a_caption_turn_and_keeps_the_questions(codes):
    train, _ = codes
    scenes = train.select(range(4))
    asked = {"questions_per_image": 4, "questions_per_conversation": 2}
    plain = [r for r in understanding_tasks(scenes, **asked) if r["task"] == "vqa"]
    closed = [r for r in understanding_tasks(scenes, caption_closes_vqa=True, **asked) if r["task"] == "vqa"]
    assert len(plain) == len(closed) == 8  # no rows added: the other tasks keep their share
    for row, before, after in zip([r for r in scenes for _ in range(2)], plain, closed):
        assert after["messages"][:-2] == before["messages"]  # the questions asked as before
        ask, caption = after["messages"][-2:]
        assert ask["content"][0]["text"] == templates.CAPTION[0] and caption["role"] == "assistant"
        assert caption["content"][0]["text"] in row["captions"]


def test_yes_no_answers_can_carry_their_reasoning_and_nothing_else_changes(codes):
    from training.data.shapes import final_answer, reasoned_answer

    train, _ = codes
    scenes = train.select(range(8))
    asked = {"questions_per_image": 8, "questions_per_conversation": 8}
    plain = [r for r in understanding_tasks(scenes, **asked) if r["task"] == "vqa"]
    reasoned = [r for r in understanding_tasks(scenes, reasoned_answers=["relation"], **asked) if r["task"] == "vqa"]
    relations = 0
    for row, before, after in zip(scenes, plain, reasoned):
        asked_questions = [m["content"][-1]["text"] for m in before["messages"] if m["role"] == "user"]
        pairs = zip(before["messages"], after["messages"])
        for question, (old, new) in zip(asked_questions, [p for p in pairs if p[0]["role"] == "assistant"]):
            qa = next(q for q in row["questions"] if q["question"] in question)
            if qa["type"] == "relation":
                relations += 1
                assert new["content"][0]["text"] == reasoned_answer(row["scene"], qa) != old["content"][0]["text"]
                assert final_answer(new["content"][0]["text"]) == old["content"][0]["text"] == qa["answer"]
            else:
                assert new == old
    assert relations > 0
    # reasoned_cells: the existence answers name each shape's cell, the rows otherwise as with bare reasoning
    bare = [r for r in understanding_tasks(scenes, reasoned_answers=["existence"], **asked) if r["task"] == "vqa"]
    celled = [
        r
        for r in understanding_tasks(scenes, reasoned_answers=["existence"], reasoned_cells=True, **asked)
        if r["task"] == "vqa"
    ]
    existences = 0
    for row, before, after in zip(scenes, bare, celled):
        for old, new in zip(before["messages"], after["messages"]):
            qa = next((q for q in row["questions"] if q["question"] in old["content"][-1]["text"]), None)
            if old["role"] == "assistant" and old != new:
                existences += 1
                text = new["content"][0]["text"]
                assert final_answer(text) == final_answer(old["content"][0]["text"])
            elif old["role"] == "user":
                assert new == old and (qa is None or qa["question"] in new["content"][-1]["text"])
    assert existences > 0
    with pytest.raises(ValueError, match=r"\['size'\] cannot be answered with reasoning"):
        understanding_tasks(scenes, reasoned_answers=["size"])


def test_a_reply_with_its_reasoning_is_scored_by_its_answer(monkeypatch):
    from training import evaluation
    from training.data.shapes import build_split

    test = build_split("test", 3, image_size=32, seed=0)
    truth = [qa["answer"] for row in test for qa in row["questions"]]
    # Every reply reasons first; the one right answer per scene is the one scored.
    replies = [f"left and right: {answer}" for answer in truth]
    monkeypatch.setattr(evaluation, "answer_questions", lambda *args, **kwargs: replies)
    result = evaluation.evaluate_vqa(None, None, test, prior={})
    assert result["model"]["accuracy"] == 1.0
    assert [example[3] for example in result["examples"]] == replies  # the examples keep the whole reply


def test_describe_first_answers_after_the_models_own_caption_of_each_image(mllm):
    from training.evaluation import ANSWER_TOKENS, _generate_text, answer_questions, describe_images, vqa_prompt

    model, processor = mllm
    model.eval()
    scenes = [row["image"] for row in shapes_at(16, 3)]
    images = [scenes[0], scenes[1], scenes[0], scenes[2]]  # the first scene asked twice
    questions = ["How many shapes are there?", "What shape is in the center?", "Is there a red circle?", "Where?"]
    batches = []
    generate = model.generate
    model.generate = lambda **inputs: batches.append(inputs["input_ids"].shape[0]) or generate(**inputs)
    try:
        answers = answer_questions(model, processor, images, questions, vqa_layout="describe_first")
    finally:
        del model.generate
    assert batches == [3, 4]  # each distinct image captioned once, then every question answered
    own = dict(zip(map(id, scenes), describe_images(model, processor, scenes)))
    prompts = [vqa_prompt(processor, q, "describe_first", own[id(i)]) for q, i in zip(questions, images)]
    assert answers == _generate_text(model, processor, prompts, images, 16, ANSWER_TOKENS, "expected")
    with pytest.raises(ValueError, match="describe_first layout needs the image's caption"):
        vqa_prompt(processor, questions[0], "describe_first")


def test_each_image_is_encoded_once_however_many_questions_ask_about_it(mllm):
    from training.evaluation import ANSWER_TOKENS, answer_questions, vqa_prompt

    model, processor = mllm
    model.eval()
    scenes = [row["image"] for row in shapes_at(16, 3)]
    images = [scenes[0], scenes[1], scenes[0], scenes[2], scenes[1]]
    questions = ["How many shapes are there?", "What shape is in the center?", "Is there a red circle?", "Where?", "?"]
    encoded = []
    encode = model.model.encode_images
    model.model.encode_images = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    try:
        answers = answer_questions(model, processor, images, questions, batch_size=2, vqa_layout="image_first")
    finally:
        del model.model.encode_images
    assert sum(encoded) == 3  # three distinct images, across batches too
    for image, question, answer in zip(images, questions, answers):  # as if each pair were asked alone
        inputs = processor(text=vqa_prompt(processor, question, "image_first"), images=image, return_tensors="pt")
        alone = model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)
        alone = alone[0, inputs["input_ids"].shape[1] :]
        assert answer == processor.tokenizer.decode(alone, skip_special_tokens=True).strip()


def test_questions_grouped_by_type_are_batched_together_and_answered_in_their_order(mllm):
    from training.evaluation import answer_questions

    model, processor = mllm
    model.eval()
    scenes = [row["image"] for row in shapes_at(16, 2)]
    images = [scenes[0], scenes[0], scenes[1], scenes[1]]
    questions = [
        "How many shapes are there?",
        "Is there a red circle?",
        "How many shapes are there?",
        "Is there a blue square?",
    ]
    kinds = ["count", "existence", "count", "existence"]
    batches = []
    generate = model.generate
    existence = lambda ids: ["is there" in text for text in processor.tokenizer.batch_decode(ids)]  # noqa: E731
    model.generate = lambda **inputs: batches.append(existence(inputs["input_ids"])) or generate(**inputs)
    try:
        grouped = answer_questions(model, processor, images, questions, batch_size=2, groups=kinds)
    finally:
        del model.generate
    assert batches == [[False, False], [True, True]]  # one batch per type, not two mixed ones
    assert grouped == answer_questions(model, processor, images, questions, batch_size=1)
    with pytest.raises(ValueError, match="groups"):
        answer_questions(model, processor, images, questions, groups=kinds[:3])


def test_several_captions_per_image_are_different_captions_of_that_scene(codes):
    train, _ = codes
    scenes = train.select(range(3))

    def captions(rows):
        return [[m["content"][0]["text"] for m in r["messages"] if m["role"] == "assistant"][0] for r in rows]

    def caption_rows(**kwargs):
        return [r for r in understanding_tasks(scenes, **kwargs) if r["task"] == "caption"]

    one, three = caption_rows(), caption_rows(captions_per_image=3)
    assert len(one) == 3 and len(three) == 9
    for index in range(3):
        drawn = captions(three[3 * index : 3 * index + 3])
        assert drawn[0] == captions(one)[index]  # the first one is the single caption row's
        assert len(set(drawn)) == 3 and set(drawn) <= set(scenes[index]["captions"])
    # More rows than the scene has captions: every caption is used, then they repeat.
    many = captions(caption_rows(captions_per_image=6)[:6])
    assert set(many) == set(scenes[0]["captions"])
    assert caption_rows(captions_per_image=0) == []
    with pytest.raises(ValueError, match="captions_per_image=-1"):
        understanding_tasks(scenes, captions_per_image=-1)


def test_question_type_weights_ask_the_weighted_types_more_often(codes):
    """`question_type_weights`: the VQA rows draw a heavy type's question more often, from the scene's own
    questions; no weights keep the uniform draw."""
    train, _ = codes

    types = {qa["question"]: qa["type"] for scene in train for qa in scene["questions"]}

    def asked(**kwargs):
        rows = understanding_tasks(train, questions_per_image=2, captions_per_image=0, **kwargs)
        prompts = [r["messages"][0]["content"][1]["text"] for r in rows]
        return [types[max((q for q in types if q in prompt), key=len)] for prompt in prompts]

    uniform, weighted = asked(), asked(question_type_weights={"shape": 20.0})
    assert len(uniform) == len(weighted) == 2 * len(train)
    assert weighted.count("shape") >= 0.8 * len(train) > 2 * uniform.count("shape")  # nearly every scene asks it
    assert asked(question_type_weights=None) == uniform
    with pytest.raises(ValueError, match=r"question_type_weights=.*\['colour'\] are not question types"):
        understanding_tasks(train, question_type_weights={"colour": 2.0})


def test_yes_no_questions_per_image_extend_each_conversation_with_true_answers(codes):
    """`yes_no_questions_per_image`: n more existence questions per image, asked in the image's conversation after
    the drawn ones, each answered as the scene says; without it the rows are those it always had."""
    from training.data.shapes import ALL_PAIRS, color_shape_pairs

    train, _ = codes

    def vqa(**kwargs):
        rows = understanding_tasks(
            train, questions_per_image=2, questions_per_conversation=8, captions_per_image=0, **kwargs
        )
        return [r["messages"] for r in rows if r["task"] == "vqa"]

    plain, extended = vqa(), vqa(yes_no_questions_per_image={"existence": 3})
    assert vqa(yes_no_questions_per_image={"existence": 0}) == plain
    for scene, before, after in zip(train, plain, extended):
        assert after[: len(before)] == before and len(after) == len(before) + 6  # three more question/answer turns
        present = color_shape_pairs(scene["scene"])
        for user, assistant in zip(after[len(before) :: 2], after[len(before) + 1 :: 2]):
            question, answer = user["content"][-1]["text"], assistant["content"][0]["text"]
            named = [(c, s) for c, s in ALL_PAIRS if f" {c} {s}?" in question]
            assert len(named) == 1, question
            assert answer == ("yes" if named[0] in present else "no")
    with pytest.raises(ValueError, match=r"yes_no_questions_per_image=.*yes/no question types"):
        understanding_tasks(train, yes_no_questions_per_image={"color": 1})
    with pytest.raises(ValueError, match=r"needs columns .*'scene'"):
        understanding_tasks(train.remove_columns("scene"), yes_no_questions_per_image={"existence": 1})


def test_position_questions_per_image_ask_where_distinct_named_shapes_stand(codes):
    """`position_questions_per_image`: the positions of n distinct shapes of the image (all of them when it holds
    fewer), asked after the drawn questions in the same conversation, each answered with the named shape's cell;
    without it the rows are those it always had."""
    from training.data.shapes import scene_from_json

    train, _ = codes

    def vqa(**kwargs):
        rows = understanding_tasks(
            train, questions_per_image=2, questions_per_conversation=8, captions_per_image=0, **kwargs
        )
        return [r["messages"] for r in rows if r["task"] == "vqa"]

    plain, extended = vqa(), vqa(position_questions_per_image=2)
    assert vqa(position_questions_per_image=0) == plain
    for scene, before, after in zip(train, plain, extended):
        objects = scene_from_json(scene["scene"])["objects"]
        added = len(after) - len(before)
        assert after[: len(before)] == before and added == 2 * min(2, len(objects))
        cells = {f"Where is the {o['color']} {o['shape']}?": o["position"] for o in objects}
        asked = [[q for q in cells if q in user["content"][-1]["text"]] for user in after[len(before) :: 2]]
        assert all(len(named) == 1 for named in asked) and len({named[0] for named in asked}) == len(asked)
        answers = [assistant["content"][0]["text"] for assistant in after[len(before) + 1 :: 2]]
        assert answers == [cells[named[0]] for named in asked]
    with pytest.raises(ValueError, match=r"position_questions_per_image: .*whole number >= 0"):
        understanding_tasks(train, position_questions_per_image=-1)
    with pytest.raises(ValueError, match=r"needs columns .*'scene'"):
        understanding_tasks(train.remove_columns("scene"), position_questions_per_image=1)


def test_several_drawings_per_image_draw_that_scene_from_its_other_captions(codes):
    """`drawings_per_image`: more text-to-image rows per scene, each prompted with another of its captions; one
    drawing per scene keeps the rows it always had."""
    train, _ = codes
    scenes = train.select(range(3))

    def drawings(**kwargs):
        rows = generation_tasks(scenes, depth=2, segments=1, caption_drop=0.0, **kwargs)
        return [
            (r["messages"][0]["content"][0]["text"], r[CODES_COLUMN]) for r in rows if r["task"] == "text_to_image"
        ]

    one, three = drawings(), drawings(drawings_per_image=3)
    assert len(one) == 3 and len(three) == 9
    assert [prompt for prompt, _ in three[::3]] == [prompt for prompt, _ in one]  # the first is the single row's
    for index in range(3):
        rows = three[3 * index : 3 * index + 3]
        assert all(row_codes == scenes[index][CODES_COLUMN] for _, row_codes in rows)  # the same scene's codes
        quoted = [[c for c in scenes[index]["captions"] if c in prompt] for prompt, _ in rows]
        assert all(quoted) and len({max(q, key=len) for q in quoted}) == 3  # three different captions
    with pytest.raises(ValueError, match="drawings_per_image=0"):
        generation_tasks(scenes, depth=2, drawings_per_image=0)


def test_full_finetune_with_text_rows_masks_only_the_codebook_rows(mllm, codes, tmp_path):
    from training.sft import prepare_full_finetune

    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base")).train()
    prepare_full_finetune(model, text_rows=True)
    rows = sft_rows(train.select(range(2)), model, processor)
    model(**CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    code_rows = torch.as_tensor(model.config.vq_config.codebook_token_ids)
    text = torch.ones(len(grad), dtype=torch.bool)
    text[code_rows] = False
    assert grad[code_rows].abs().sum() == 0 and grad[text].abs().sum(-1).gt(0).sum() > 3
    with pytest.raises(ValueError, match="train_text_embeddings=True needs full fine-tuning"):
        run_sft(model, processor, rows, tmp_path / "t", lora={"r": 4}, train_text_embeddings=True, max_steps=1)


def test_full_finetune_with_named_words_trains_only_their_rows(mllm, codes, tmp_path):
    """`train_text_embeddings=[words]`: the rows those words enter with train (and the image special rows), every
    other row of the table keeps a zero gradient; a named row that is a visual code stays frozen, with a warning."""
    from training.sft import image_special_token_ids, prepare_full_finetune, word_row_ids

    model, processor = mllm
    train, _ = codes
    words = word_row_ids(processor.tokenizer, ["red", "circle"])
    assert set(processor.tokenizer(" red circle", add_special_tokens=False)["input_ids"]) <= set(words)
    for bad in ("red", [], ["red", " "]):
        with pytest.raises(ValueError, match="a non-empty list of words"):
            word_row_ids(processor.tokenizer, bad)
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base")).train()
    special, codebook = image_special_token_ids(model), set(model.config.vq_config.codebook_token_ids)
    rows = sft_rows(train.select(range(2)), model, processor)
    batch = CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    seen = set(batch["input_ids"].flatten().tolist()) - codebook - set(special)
    chosen = sorted(seen)[:3]  # text rows this batch reads (this test model's words may share rows with codes)
    prepare_full_finetune(model, text_rows=chosen)
    model(**batch).loss.backward()
    moved = set(model.get_input_embeddings().weight.grad.abs().sum(-1).nonzero().flatten().tolist())
    assert set(chosen) <= moved <= set(chosen) | set(special)
    model.zero_grad()
    code_row = sorted(codebook)[0]
    with pytest.warns(UserWarning, match=rf"text rows \[{code_row}\] are visual codes and stay frozen"):
        prepare_full_finetune(model, text_rows=[code_row, *chosen])
    model(**batch).loss.backward()
    assert model.get_input_embeddings().weight.grad[code_row].abs().sum() == 0  # the codebook row stays frozen


def test_sft_task_subset_keeps_exactly_those_rows(mllm, codes):
    """`tasks=` trains a subset: the same rows as the full mix, filtered, and an unknown name is refused."""
    from training.stage2 import stage_tasks

    model, _ = mllm
    train, _ = codes
    depth = model.config.vq_config.depth
    everything = stage_tasks(train, "sft", depth, segments=2)
    for subset in (["vqa"], ["text_to_image"], ["caption", "continue_image"]):
        rows = stage_tasks(train, "sft", depth, segments=2, tasks=subset)
        expected = everything.filter(lambda task: task in subset, input_columns="task")
        assert set(rows["task"]) == set(subset) and rows["messages"] == expected["messages"]
    with pytest.raises(ValueError, match=r"tasks \['drawing'\] are not SFT tasks"):
        stage_tasks(train, "sft", depth, tasks=["vqa", "drawing"])


def test_sft_config_takes_either_checkpointing_spelling_without_the_deprecation_warning():
    """Recipes written for older transformers say `gradient_checkpointing`; 5.24 renamed it and warns."""
    import warnings

    from training.sft import unicode_sft_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for spelling in ("gradient_checkpointing", "activation_checkpointing"):
            for value in (True, False):
                config = unicode_sft_config("unused-output-dir", use_cpu=True, **{spelling: value})
                assert (
                    getattr(config, "activation_checkpointing", getattr(config, "gradient_checkpointing", None))
                    is value
                )


def test_an_fsdp_launch_config_on_cpu_says_it_runs_as_ddp(monkeypatch):
    # Measured: `accelerate launch --config_file configuration/accelerate/fsdp2.yaml --num_processes 2` on this CPU
    # machine trained with DDP reducers, not FSDP. The user must hear that, not find out from the memory bill.
    import warnings

    from training.sft import unicode_sft_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.warns(UserWarning, match="on CPU .* plain DDP: every rank holds the whole model"):
        unicode_sft_config("unused-output-dir", use_cpu=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        unicode_sft_config("unused-output-dir", use_cpu=True)


def test_sft_starts_from_the_decompression_model_only_when_asked_or_present(tmp_path):
    """The demo with decompression turned off must not fine-tune the decompression model an earlier run
    left in the folder; the CLI default takes it when it is complete."""
    from training.stage2 import stage_paths

    decompressed = tmp_path / "stage2" / "decompress" / "model"
    with pytest.raises(ValueError, match="from_decompressed=True but .* run the decompress stage first"):
        stage_paths(tmp_path, "sft", from_decompressed=True)
    assert stage_paths(tmp_path, "sft")["base"] == tmp_path / "stage2" / "base"
    decompressed.mkdir(parents=True)
    (decompressed / "COMPLETE").write_text("ok\n")
    assert stage_paths(tmp_path, "sft")["base"] == decompressed
    assert stage_paths(tmp_path, "sft", from_decompressed=True)["base"] == decompressed
    assert stage_paths(tmp_path, "sft", from_decompressed=False)["base"] == tmp_path / "stage2" / "base"


def test_reinit_decoder_redraws_the_layers_and_keeps_the_codebook_rows(mllm, tmp_path):
    """`reinit_decoder`: fresh decoder layers (seeded), the embedding table — the unified codebook — untouched."""
    from training.sft import reinitialize_decoder_layers
    from training.stage2 import StageIIArguments, train_stage2

    model, processor = mllm
    path = _save(model, processor, tmp_path / "base")
    first, second = (type(model).from_pretrained(path) for _ in range(2))
    layers_before = [p.clone() for p in first.model.language_model.layers.parameters()]
    embedding = first.get_input_embeddings().weight.clone()
    names = reinitialize_decoder_layers(first, seed=3)
    reinitialize_decoder_layers(second, seed=3)
    layers_after = list(first.model.language_model.layers.parameters())
    assert names and all(n.startswith(("layers.", "norm.")) for n in names)
    assert all(not torch.equal(a, b) for a, b in zip(layers_before, layers_after) if a.dim() == 2)
    assert torch.equal(first.get_input_embeddings().weight, embedding)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    with pytest.raises(ValueError, match="reinit_decoder=True needs full fine-tuning"):
        train_stage2(StageIIArguments(run_dir=str(tmp_path / "run"), reinit_decoder=True, lora=True))
    with pytest.raises(ValueError, match="decoder_layers needs reinit_decoder=True"):
        train_stage2(StageIIArguments(run_dir=str(tmp_path / "run"), decoder_layers=3, lora=False))


def test_redraw_text_rows_redraws_every_row_but_the_codes_and_the_padding(mllm, tmp_path):
    """`redraw_text_rows`: the text and image special rows drawn afresh at the LLM's init scale (seeded), the codebook
    rows bit-identical; refused without fresh decoder layers."""
    from training.sft import redraw_text_rows
    from training.stage2 import StageIIArguments, train_stage2

    model, processor = mllm
    path = _save(model, processor, tmp_path / "base")
    first, second = (type(model).from_pretrained(path) for _ in range(2))
    before = first.get_input_embeddings().weight.detach().clone()
    codes = torch.as_tensor(first.config.vq_config.codebook_token_ids)
    pad = first.get_input_embeddings().padding_idx
    redrawn = redraw_text_rows(first, seed=5)
    redraw_text_rows(second, seed=5)
    after = first.get_input_embeddings().weight.detach()
    assert set(redrawn).isdisjoint(codes.tolist()) and pad not in redrawn
    assert len(redrawn) == len(after) - len(codes) - (pad is not None)
    assert torch.equal(after[codes], before[codes])
    if pad is not None:
        assert torch.equal(after[pad], before[pad])
    assert not torch.equal(after[redrawn], before[redrawn])
    std = first.config.get_text_config().initializer_range
    assert abs(after[redrawn].std().item() - std) < 0.2 * std
    assert torch.equal(after, second.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="redraw_text_rows=True needs reinit_decoder=True"):
        train_stage2(StageIIArguments(run_dir=str(tmp_path / "run"), redraw_text_rows=True, lora=False))


def test_draw_position_tables_draws_both_tables_at_the_llm_init_and_nothing_else(mllm, tmp_path):
    """`position_init: normal`: the image and code position tables drawn at the LLM's init scale (seeded) instead of
    zero, every other weight bit-identical; a model without tables, an unknown init and an LLM's own layers refused."""
    from training.sft import draw_position_tables
    from training.stage2 import StageIIArguments, train_stage2

    model, processor = mllm
    path = _save(model, processor, tmp_path / "base")
    first, second, bare = (type(model).from_pretrained(path) for _ in range(3))
    for loaded in (first, second):
        loaded.model.add_image_position_embedding()
        loaded.model.add_code_position_embedding()
    before = {name: p.detach().clone() for name, p in first.named_parameters()}
    drawn = draw_position_tables(first, seed=7)
    draw_position_tables(second, seed=7)
    assert drawn == ["image_position_embedding.weight", "code_position_embedding.weight"]
    std = first.config.get_text_config().initializer_range
    for table in (first.model.image_position_embedding, first.model.code_position_embedding):
        assert abs(table.weight.std().item() - std) < 0.2 * std
        # every cell its own vector: no two rows alike
        unit = torch.nn.functional.normalize(table.weight, dim=1)
        assert (unit @ unit.T - torch.eye(len(unit))).abs().max() < 0.9
    changed = {name for name, p in first.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"model.image_position_embedding.weight", "model.code_position_embedding.weight"}
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    with pytest.raises(ValueError, match="no position table"):
        draw_position_tables(bare)
    with pytest.raises(ValueError, match="position_init='uniform' is not one of"):
        train_stage2(StageIIArguments(run_dir=str(tmp_path / "run"), position_init="uniform", lora=False))
    with pytest.raises(ValueError, match="position_init='normal' needs reinit_decoder=True"):
        train_stage2(StageIIArguments(run_dir=str(tmp_path / "run"), position_init="normal", lora=False))


def test_reinit_decoder_can_draw_another_number_of_layers_that_saves_and_reloads(mllm, tmp_path):
    from training.sft import reinitialize_decoder_layers

    model, processor = mllm
    deeper = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))
    embedding = deeper.get_input_embeddings().weight.clone()
    depth = len(deeper.model.language_model.layers) + 2
    reinitialize_decoder_layers(deeper, seed=0, num_layers=depth)
    assert len(deeper.model.language_model.layers) == depth == deeper.config.get_text_config().num_hidden_layers
    assert torch.equal(deeper.get_input_embeddings().weight, embedding)
    ids = torch.tensor([[1, 5, 7, 9]])
    logits = deeper(input_ids=ids).logits
    deeper.save_pretrained(tmp_path / "deeper")
    reloaded = type(deeper).from_pretrained(tmp_path / "deeper")
    assert len(reloaded.model.language_model.layers) == depth and torch.allclose(
        reloaded(input_ids=ids).logits, logits
    )
    with pytest.raises(ValueError, match="decoder_layers=0 must be a whole number"):
        reinitialize_decoder_layers(deeper, num_layers=0)


def test_reinit_decoder_can_draw_wider_layers_with_more_heads_that_generate_and_reload(mllm, tmp_path):
    """`decoder_intermediate_size` / `decoder_heads`: the fresh layers' MLP width and head count (each head as wide
    as the LLM's width allows, the rotary table with it); the codebook rows untouched; the saved model reloads."""
    from training.sft import reinitialize_decoder_layers
    from training.stage2 import StageIIArguments, train_stage2

    model, processor = mllm
    wider = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))
    embedding = wider.get_input_embeddings().weight.clone()
    text = wider.config.get_text_config()
    heads = text.num_attention_heads * 2
    reinitialize_decoder_layers(wider, seed=0, intermediate_size=3 * text.intermediate_size, num_heads=heads)
    layer = wider.model.language_model.layers[0]
    assert layer.mlp.up_proj.out_features == text.intermediate_size and text.num_attention_heads == heads
    assert text.head_dim == text.hidden_size // heads and layer.self_attn.head_dim == text.head_dim
    assert wider.model.language_model.rotary_emb.inv_freq.numel() == text.head_dim // 2
    assert torch.equal(wider.get_input_embeddings().weight, embedding)
    ids = torch.tensor([[1, 5, 7, 9]])
    logits = wider(input_ids=ids).logits
    wider.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # the KV cache takes the new head width
    wider.save_pretrained(tmp_path / "wider")
    reloaded = type(wider).from_pretrained(tmp_path / "wider")
    assert torch.allclose(reloaded(input_ids=ids).logits, logits)
    with pytest.raises(ValueError, match=f"decoder_heads=7 does not divide the LLM's width {text.hidden_size}"):
        reinitialize_decoder_layers(wider, num_heads=7)
    with pytest.raises(ValueError, match="decoder_intermediate_size=0 must be a whole number"):
        reinitialize_decoder_layers(wider, intermediate_size=0)
    with pytest.raises(ValueError, match="decoder_heads needs reinit_decoder=True"):
        train_stage2(StageIIArguments(run_dir=str(tmp_path / "run"), decoder_heads=8, lora=False))


def _three_head_steps(model, processor, rows, output_dir, output_head: str):
    """Three full fine-tuning steps at a high learning rate, so every trained row moves; returns the trained model."""
    trainer, _ = run_sft(
        model,
        processor,
        rows,
        output_dir,
        lora=False,
        output_head=output_head,
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        save_strategy="no",
        logging_steps=1,
    )
    return trainer.model


def test_trained_output_head_learns_while_the_codebook_rows_stay_bit_identical(mllm, codes, tmp_path):
    """`output_head="trained"` unties the LM head (a copy of the tied rows), trains it, saves it as its own weight
    and reloads untied; the input embedding's codebook rows do not move."""
    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding  # tied, like the stage-0 LLMs
    code_rows = torch.as_tensor(model.config.vq_config.codebook_token_ids)
    codebook_before = embedding[code_rows].detach().clone()
    head_before = embedding.detach().clone()
    rows = sft_rows(train.select(range(8)), model, processor)
    trained = _three_head_steps(model, processor, rows, tmp_path / "sft", "trained")
    assert (
        trained.lm_head.weight is not trained.get_input_embeddings().weight and not trained.config.tie_word_embeddings
    )
    assert not torch.equal(trained.lm_head.weight.detach(), head_before)
    assert torch.equal(trained.get_input_embeddings().weight[code_rows].detach(), codebook_before)
    trained.save_pretrained(tmp_path / "out")
    reloaded = type(trained).from_pretrained(tmp_path / "out")
    assert reloaded.lm_head.weight is not reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.lm_head.weight, trained.lm_head.weight.detach())
    with pytest.raises(ValueError, match="output_head='trained' needs full fine-tuning"):
        run_sft(model, processor, rows, tmp_path / "lora", lora={"r": 4}, output_head="trained", max_steps=1)
    with pytest.raises(ValueError, match="output_head='frozen' is not one of"):
        run_sft(model, processor, rows, tmp_path / "bad", lora=False, output_head="frozen", max_steps=1)


def test_a_head_trained_on_its_code_rows_keeps_its_text_rows_equal_to_the_input_rows(mllm, codes, tmp_path):
    """`output_head="trained_code_rows"`: the untied head's code rows learn; its text rows stay bit-identical copies of
    the input rows, so a word is written with the row it is read with."""
    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))
    code_rows = torch.as_tensor(model.config.vq_config.codebook_token_ids)
    text = torch.ones(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    text[code_rows] = False
    text[torch.as_tensor(image_special_token_ids(model))] = False
    rows_before = model.get_input_embeddings().weight.detach().clone()
    rows = sft_rows(train.select(range(8)), model, processor)
    trained = _three_head_steps(model, processor, rows, tmp_path / "sft", "trained_code_rows")
    head = trained.lm_head.weight.detach()
    assert head.data_ptr() != trained.get_input_embeddings().weight.data_ptr()
    assert torch.equal(head[text], rows_before[text])
    assert not torch.equal(head[code_rows], rows_before[code_rows])
    with pytest.raises(ValueError, match="train_text_embeddings=True would move"):
        run_sft(
            model,
            processor,
            rows,
            tmp_path / "bad",
            lora=False,
            output_head="trained_code_rows",
            train_text_embeddings=True,
            max_steps=1,
        )


def test_row_loss_is_the_mean_of_each_rows_own_mean(mllm, codes, tmp_path):
    """`loss_normalization="row"`: a one-word answer weighs as much as an image's codes; "token" is TRL's loss."""
    from training.sft import _sft_trainer_class, add_labelled_positions_lm_head, unicode_sft_config

    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))  # the trainer patches its model
    rows = sft_rows(train.select(range(2)), model, processor)
    batch = CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nats = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = labels != IGNORE_INDEX
    per_row = nats.sum(-1) / mask.sum(-1)
    losses = {}
    for normalization in ("row", "token"):
        trainer = _sft_trainer_class()(
            model=model,
            args=unicode_sft_config(tmp_path / normalization, max_steps=1),
            train_dataset=rows,
            data_collator=CodesCollator(processor.tokenizer.pad_token_id),
            processing_class=processor,
            loss_normalization=normalization,
        )
        add_labelled_positions_lm_head(trainer.model)
        with torch.no_grad():
            losses[normalization] = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert losses["row"] == pytest.approx(float(per_row.mean()), rel=1e-4)
    assert losses["token"] == pytest.approx(float(nats[mask].mean()), rel=1e-4)
    # The FLOPs the trainer logs (trainer_state.json's total_flos) are Trainer's own estimate, counted once.
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    assert abs(losses["row"] - losses["token"]) > 1e-3  # rows of different lengths: the two really differ
    with pytest.raises(ValueError, match="loss_normalization='sum' is not one of"):
        _sft_trainer_class()(
            model=model,
            args=unicode_sft_config(tmp_path / "x", max_steps=1),
            train_dataset=rows,
            data_collator=CodesCollator(processor.tokenizer.pad_token_id),
            processing_class=processor,
            loss_normalization="sum",
        )


def test_split_by_length_cuts_the_padding_and_keeps_every_row_and_its_image(mllm, codes):
    """`split_by_length`: two micro-batches of the rows sorted by length, each cut to its longest row, every row's
    tokens, labels and input image where they were."""
    from training.sft import split_by_length

    model, processor = mllm
    train, _ = codes
    rows = sft_rows(train.select(range(4)), model, processor)
    batch = CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    config = model.config
    parts = split_by_length(batch, config.image_token_id, config.image_seq_length)
    assert len(parts) == 2
    lengths = batch["attention_mask"].sum(-1)
    assert sum(p["input_ids"].numel() for p in parts) < batch["input_ids"].numel()  # fewer padded tokens
    assert int(parts[0]["attention_mask"].sum(-1).max()) <= int(parts[1]["attention_mask"].sum(-1).min())
    images = iter(batch["image_codes"])
    expected = {}  # each row's (tokens, labels) -> its image, in the collator's order
    for i in range(len(lengths)):
        n = int(lengths[i])
        has_image = bool((batch["input_ids"][i] == config.image_token_id).any())
        key = (tuple(batch["input_ids"][i, :n].tolist()), tuple(batch["labels"][i, :n].tolist()))
        expected[key] = next(images).tolist() if has_image else None
    seen = {}
    for part in parts:
        assert part["input_ids"].shape[1] == int(part["attention_mask"].sum(-1).max())
        part_images = iter(part.get("image_codes", []))
        for i in range(len(part["input_ids"])):
            n = int(part["attention_mask"][i].sum())
            has_image = bool((part["input_ids"][i] == config.image_token_id).any())
            key = (tuple(part["input_ids"][i, :n].tolist()), tuple(part["labels"][i, :n].tolist()))
            seen[key] = next(part_images).tolist() if has_image else None
    assert seen == expected
    one_row = {k: v[:1] for k, v in batch.items() if k != "image_codes"}
    assert split_by_length(one_row, 0, 1) == [one_row]  # nothing to split
    with pytest.raises(ValueError, match="image placeholders for"):
        wrong = {**batch, "image_codes": batch["image_codes"][:1]}
        split_by_length(wrong, config.image_token_id, config.image_seq_length)


@pytest.mark.parametrize("normalization", ["token", "row"])
def test_length_split_takes_the_same_step_as_the_whole_batch(mllm, codes, tmp_path, normalization):
    """`length_split`: the loss and every gradient of a batch run as two micro-batches are the whole batch's, with
    and without the Trainer's token count."""
    from training.sft import _sft_trainer_class, add_labelled_positions_lm_head, unicode_sft_config

    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))
    rows = sft_rows(train.select(range(4)), model, processor)
    batch = CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    counted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    results = {}
    for split in (False, True):
        trainer = _sft_trainer_class()(
            model=model,
            args=unicode_sft_config(tmp_path / str(split), max_steps=1),
            train_dataset=rows,
            data_collator=CodesCollator(processor.tokenizer.pad_token_id),
            processing_class=processor,
            loss_normalization=normalization,
            length_split=split,
        )
        assert (trainer.split_image_layout is not None) == split  # the split batch really runs in two parts
        add_labelled_positions_lm_head(trainer.model)
        trainer.model.train()
        for items in (None, counted):
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
            loss.backward()
            grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
            results[split, items] = (float(loss.detach()), grads)
    for items in (None, counted):
        (whole, whole_grads), (split_loss, split_grads) = results[False, items], results[True, items]
        assert split_loss == pytest.approx(whole, rel=1e-5)
        assert len(whole_grads) == len(split_grads) > 0
        for a, b in zip(whole_grads, split_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wall_clock_budget_ends_training_and_anneals_the_rate_over_its_seconds(mllm, codes, tmp_path, monkeypatch):
    """`max_seconds`: the schedule follows the elapsed fraction of the budget and the run stops when it is spent."""
    from training import sft

    clock = [100.0]
    monkeypatch.setattr(sft.time, "perf_counter", lambda: clock[0])
    budget = sft.WallClockBudget(10.0, warmup_fraction=0.1)
    assert budget.lr_factor(0) == 0.01  # not started: the warm-up's floor
    budget.on_train_begin(None, None, None)
    clock[0] = 100.5
    assert budget.lr_factor(0) == pytest.approx(0.5)  # half-way through the warm-up
    clock[0] = 101.0 + 4.5
    assert budget.lr_factor(0) == pytest.approx(0.5)  # cosine half-way
    control = type("Control", (), {"should_training_stop": False})()
    assert not budget.on_step_end(None, None, control).should_training_stop
    clock[0] = 110.0
    assert budget.lr_factor(0) == pytest.approx(0.0) and budget.on_step_end(None, None, control).should_training_stop
    with pytest.raises(ValueError, match="max_seconds=0 must be a positive"):
        sft.WallClockBudget(0)
    monkeypatch.undo()
    model, processor = mllm
    rows = sft_rows(codes[0].select(range(4)), model, processor)
    trainer, metrics = run_sft(
        type(model).from_pretrained(_save(model, processor, tmp_path / "base")),
        processor,
        rows,
        tmp_path / "timed",
        lora=False,
        max_seconds=1.0,
        save_strategy="no",
        logging_steps=1,
    )
    assert 1 <= metrics["global_step"] < 10**6 and 1.0 <= metrics["train_seconds"] < 30
    assert metrics["train_tokens"] > 0


def test_stage2_arguments_come_from_the_recipe_once(tmp_path):
    """The CLI and the demo build stage II through `StageIIArguments.from_recipe`: the recipe's values, then the
    caller's, and LoRA drops the full-fine-tuning settings the recipe holds."""
    from training.presets import load_recipe
    from training.stage2 import StageIIArguments

    recipe = load_recipe("tiny")["stage2"]
    args = StageIIArguments.from_recipe(tmp_path, "sft", "tiny")
    assert args.learning_rate == recipe["sft"]["learning_rate"] and args.batch_size == recipe["sft"]["batch_size"]
    assert (args.output_head, args.decoder_layers, args.reinit_decoder) == (
        recipe["output_head"],
        recipe["decoder_layers"],
        True,
    )
    assert args.tasks == recipe["tasks"] and args.extra == recipe["trainer"] and args.lora is False
    assert (
        StageIIArguments.from_recipe(tmp_path, "sft", "tiny", learning_rate=None).learning_rate
        == recipe["sft"]["learning_rate"]
    )
    assert StageIIArguments.from_recipe(tmp_path, "sft", "tiny", learning_rate=5e-4).learning_rate == 5e-4

    lora = StageIIArguments.from_recipe(tmp_path, "sft", "tiny", lora=True)
    assert (lora.output_head, lora.decoder_layers, lora.reinit_decoder) == ("tied", None, False)
    assert lora.image_positions == recipe["image_positions"]  # not a full-fine-tuning-only setting

    with pytest.raises(TypeError, match="learning_rat"):
        StageIIArguments.from_recipe(tmp_path, "sft", "tiny", learning_rat=1e-3)
    with pytest.raises(ValueError, match="recipes|preset"):
        StageIIArguments.from_recipe(tmp_path, "sft", "nosuch")


def test_centred_drawings_draw_centred_scenes_and_leave_the_understanding_rows_alone(mllm, tmp_path, monkeypatch):
    """`centred_drawings`: the text-to-image rows draw scenes whose shapes sit at their cells' centres, cached apart
    from the jittered scenes that the caption and VQA rows read."""
    import json

    import training.stage2 as stage2
    from training.stage2 import shapes_code_datasets, stage_tasks

    render = stage2.build_split  # the Shapes world renders >= 32 px; the test model reads 16 px
    monkeypatch.setattr(
        stage2,
        "build_split",
        lambda split, n, size, seed, jitter: render(split, n, 32, seed, jitter=jitter).map(
            lambda r: {"image": r["image"].resize((size, size))}
        ),
    )
    model, _ = mllm
    jittered, _ = shapes_code_datasets(tmp_path, model, 8, 2)
    centred, _ = shapes_code_datasets(tmp_path, model, 8, 2, jitter=False)
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == [
        "train-8-s0",
        "train-8-s0-centred",
        "validation-2-s0",
        "validation-2-s0-centred",
    ]

    def off_centre(dataset):
        scenes = [json.loads(scene) for scene in dataset["scene"]]
        objects = [{**o, "cell": scene["image_size"] / 3} for scene in scenes for o in scene["objects"]]
        return max(
            abs(o["center"][0] - (o["col"] + 0.5) * o["cell"]) + abs(o["center"][1] - (o["row"] + 0.5) * o["cell"])
            for o in objects
        )

    assert off_centre(centred) < 1e-3 < off_centre(jittered)
    depth = model.config.vq_config.depth
    rows = stage_tasks(jittered, "sft", depth, segments=2, drawing_codes=centred)
    alone = stage_tasks(jittered, "sft", depth, segments=2)
    drawn = stage_tasks(centred, "sft", depth, segments=2)

    def pick(dataset, task):
        chosen = dataset.filter(lambda t: t == task, input_columns="task")
        return list(zip(chosen["messages"], chosen["codes"]))

    for task in ("caption", "vqa"):
        assert pick(rows, task) == pick(alone, task)
    for task in ("text_to_image", "continue_image"):
        assert pick(rows, task) == pick(drawn, task) != pick(alone, task)


def test_axial_positions_set_the_layout_and_refuse_a_base_with_per_index_tables():
    """`StageIIArguments.axial_positions`: the tables stage II adds are axial; a base that already holds per-index
    tables is refused by the flag's name rather than mixed."""
    model, _ = tiny_mllm()
    _use_axial_positions(model)
    assert model.config.position_embedding_layout == "axial"
    assert hasattr(model.model.add_code_position_embedding(), "columns")
    indexed, _ = tiny_mllm()
    indexed.model.add_image_position_embedding()
    with pytest.raises(ValueError, match="axial_positions=True, but the model already has"):
        _use_axial_positions(indexed)


@pytest.mark.parametrize("layout", ["index", "axial"])
def test_position_tables_train_whole_under_lora_in_either_layout(layout):
    """LoRA wraps the position tables as modules to save; the model must still add them (PEFT's wrapper is not the
    table's class), and the wrapped copy is what trains."""
    model, processor = tiny_mllm()
    model.config.position_embedding_layout = layout
    model.model.add_image_position_embedding()
    model.model.add_code_position_embedding()
    peft_model = get_peft_model(model, unicode_lora_config(model))
    codes = model.model.codebook_token_ids[:4].tolist()
    ids = torch.tensor([[3, model.config.boi_token_id, *codes]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if "code_position_embedding" in n and p.grad is not None]
    assert trained and all("modules_to_save" in n for n in trained)


def test_the_image_input_adapter_trains_whole_under_lora_and_full_finetuning_while_the_codebook_stays(mllm, codes):
    """`StageIIArguments.image_input_adapter_size`: the adapter stage II adds trains (as a module to save under LoRA,
    wholly under full fine-tuning) and the codebook rows get no gradient; a negative size is refused by name before
    any work."""
    from training.sft import prepare_full_finetune
    from training.stage2 import StageIIArguments, train_stage2

    model, processor = mllm
    train, _ = codes
    lora_model, lora_processor = tiny_mllm()
    lora_model.model.add_image_input_adapter(16)
    peft_model = get_peft_model(lora_model, unicode_lora_config(lora_model))
    inputs = lora_processor(text="<image> what?", images=lora_processor.postprocess(random_images(1)))
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if "image_input_adapter" in n and p.grad is not None]
    assert trained and all("modules_to_save" in n for n in trained)
    full = copy.deepcopy(model).train()
    full.model.add_image_input_adapter(16)
    names = prepare_full_finetune(full)
    assert {"model.image_input_adapter.up.weight", "model.image_input_adapter.down.weight"} <= set(names)
    rows = sft_rows(train.select(range(2)), full, processor)
    full(**CodesCollator(processor.tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])).loss.backward()
    assert full.model.image_input_adapter.down.weight.grad.abs().sum() > 0
    code_rows = torch.as_tensor(full.config.vq_config.codebook_token_ids)
    assert full.get_input_embeddings().weight.grad[code_rows].abs().sum() == 0
    with pytest.raises(ValueError, match="image_input_adapter_size=-4 must be a whole number >= 0"):
        train_stage2(StageIIArguments(run_dir="unused", image_input_adapter_size=-4))


def test_rehearsal_rows_are_the_llms_own_text_cached_and_mixed_at_their_share(mllm, codes, tmp_path):
    from training.rehearsal import rehearsal_cache, rehearsal_dataset, rehearsal_share
    from training.sft import image_special_token_ids

    model, processor = mllm
    tokenizer = processor.tokenizer
    rows = sft_rows(codes[0], model, processor)
    distinct, mixed = rehearsal_share(0.2, len(rows), rows_trained=10, max_samples=8)
    assert (distinct, mixed) == (2, round(0.25 * len(rows)))  # a fifth of the mix; only what 10 rows can read
    assert rehearsal_share(0.2, len(rows), rows_trained=1000, max_samples=8)[0] == 8  # sampling time is capped
    texts = rehearsal_dataset(tmp_path, model, tokenizer, (distinct, mixed), 8, 0, rows.features)
    assert len(texts) == mixed and set(texts["task"]) == {"text"}
    assert len({tuple(ids) for ids in texts["input_ids"]}) <= distinct
    special = set(image_special_token_ids(model))
    for ids, labels, image_codes in zip(texts["input_ids"], texts["labels"], texts["image_codes"]):
        assert ids[0] == tokenizer.bos_token_id and 1 < len(ids) <= 9 and not image_codes
        assert labels == [IGNORE_INDEX] + ids[1:]  # every sampled token is learnt, BOS is given
        assert not special & set(ids)  # the image tokens are not the LLM's language
    assert rehearsal_cache(tmp_path, distinct, 8, 0).is_file()
    again = rehearsal_dataset(tmp_path, None, tokenizer, (distinct, mixed), 8, 0, rows.features)  # no model: cache
    assert again["input_ids"] == texts["input_ids"]
    cache = rehearsal_cache(tmp_path, distinct, 8, 0)
    stale = {**json.loads(cache.read_text()), "model": "/another/base", "rows": [[5]] * distinct}
    cache.write_text(json.dumps(stale))  # samples of another model: this one samples its own again
    assert (
        rehearsal_dataset(tmp_path, model, tokenizer, (distinct, mixed), 8, 0, rows.features)["input_ids"]
        == texts["input_ids"]
    )
    assert json.loads(cache.read_text())["model"] != "/another/base"
    # samples of this model in another precision than SFT trains in: sampled again, in the asked one
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "bf16": True, "rows": [[5]] * distinct}))
    assert (
        rehearsal_dataset(tmp_path, model, tokenizer, (distinct, mixed), 8, 0, rows.features, bf16=False)["input_ids"]
        == texts["input_ids"]
    )
    assert json.loads(cache.read_text())["bf16"] is False
    mixed_rows = datasets.concatenate_datasets([rows, texts])
    batch = CodesCollator(tokenizer.pad_token_id)([mixed_rows[0], mixed_rows[len(rows)]])
    assert batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="rehearsal_fraction=1.0 must lie in"):
        rehearsal_share(1.0, len(rows), 10, 8)


def test_rehearsal_references_are_the_llms_next_token_distribution_at_each_sampled_token(mllm, tmp_path):
    """`rehearsal_top_k`: every sampled token keeps the LLM's k most likely ids there and their probabilities, the
    distribution a teacher-forced forward of the same text gives (the sampler's cache does not change it)."""
    from training.rehearsal import sample_rehearsal_text
    from training.sft import image_special_token_ids

    model, processor = mllm
    tokenizer = processor.tokenizer
    sampled = sample_rehearsal_text(model, tokenizer, rows=3, tokens=6, seed=0, top_k=4)
    assert sampled == sample_rehearsal_text(model, tokenizer, rows=3, tokens=6, seed=0, top_k=4)  # seeded
    special = image_special_token_ids(model)
    for row, ids, probs in zip(sampled["rows"], sampled["reference_ids"], sampled["reference_probs"]):
        assert len(ids) == len(probs) == len(row) and all(len(k) == 4 for k in ids)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=torch.tensor([[tokenizer.bos_token_id] + row])).logits[0, :-1].float()
        logits[:, special] = -float("inf")
        expected = logits.softmax(-1)
        assert torch.allclose(torch.tensor(probs), expected.gather(-1, torch.tensor(ids)), atol=1e-4)
        assert torch.allclose(torch.tensor(probs), expected.topk(4).values, atol=1e-4)
    with pytest.raises(ValueError, match="rehearsal_top_k=-1"):
        sample_rehearsal_text(model, tokenizer, rows=1, tokens=4, top_k=-1)


def test_reference_loss_is_best_at_the_reference_not_at_the_drawn_token():
    """The distribution target's optimum is the reference (its top k and its remaining mass), where the drawn
    token's log-prob alone prefers all mass on the drawn token; rows without references score the drawn token."""
    from training.sft import reference_log_prob

    reference = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    ids, probs = torch.tensor([[0, 1]]), reference[:2].unsqueeze(0)
    drawn = torch.tensor([3])  # a token outside the top 2, as samples often are

    def value(distribution, with_reference=True):
        log_probs = distribution.log().unsqueeze(0)
        weights = probs if with_reference else torch.zeros_like(probs)
        return reference_log_prob(log_probs, drawn, ids, weights).item()

    memorised = torch.tensor([0.01, 0.01, 0.01, 0.95, 0.01, 0.01])
    assert value(reference) > value(memorised)
    assert value(reference, with_reference=False) < value(memorised, with_reference=False)
    assert value(reference, with_reference=False) == pytest.approx(math.log(0.1))
    logits = torch.zeros(6, requires_grad=True)  # the optimum found by descent is the reference on the partition
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(500):
        optimizer.zero_grad()
        (-reference_log_prob(logits.log_softmax(-1).unsqueeze(0), drawn, ids, probs)).sum().backward()
        optimizer.step()
    learnt = logits.softmax(-1).detach()
    assert learnt[:2].tolist() == pytest.approx([0.5, 0.2], abs=1e-3)
    assert learnt[2:].sum().item() == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize("top_k", [0, 8])
def test_repeated_rehearsal_rows_keep_the_llms_distribution_with_references(mllm, codes, tmp_path, top_k):
    """Self-rehearsal rows read many times: scored on the drawn tokens, training learns those tokens (their
    probability grows); scored against the LLM's distribution (`rehearsal_top_k`), it keeps what the LLM would
    write."""
    from training.rehearsal import rehearsal_dataset, with_reference_columns

    model, processor = mllm
    model = type(model).from_pretrained(_save(model, processor, tmp_path / f"base-{top_k}"))
    tokenizer = processor.tokenizer
    features = sft_rows(codes[0].select(range(2)), model, processor).features
    rows = rehearsal_dataset(tmp_path, model, tokenizer, (2, 16), 8, 0, features, top_k=top_k)
    if top_k:
        assert set(rows.column_names) >= {"reference_ids", "reference_probs"}
        task_rows = with_reference_columns(sft_rows(codes[0].select(range(2)), model, processor))
        batch = CodesCollator(tokenizer.pad_token_id)([task_rows[0], rows[0]])
        labelled = batch["labels"][1] != IGNORE_INDEX
        assert batch["reference_probs"][1, labelled].gt(0).all() and not batch["reference_probs"][0].any()
    text = torch.tensor([rows[0]["input_ids"]])

    def drawn_probability(m):
        with torch.no_grad():
            probs = m(input_ids=text).logits[0, :-1].float().softmax(-1)
        return probs.gather(-1, text[0, 1:].unsqueeze(-1)).mean().item()

    before = drawn_probability(model)
    trainer, _ = run_sft(
        model,
        processor,
        rows,
        tmp_path / f"sft-{top_k}",
        lora=False,
        max_steps=40,
        learning_rate=3e-2,
        per_device_train_batch_size=4,
        save_strategy="no",
        logging_steps=10,
        code_logits="code_rows",
    )
    after = drawn_probability(trainer.model.eval())
    if top_k:
        assert after < 1.25 * before
    else:
        assert after > 2 * before


def test_first_rows_sampler_draws_the_first_rows_first_then_the_others_as_one_resumable_stream():
    from training.sft import FirstRowsSampler

    first = [7, 8, 9]
    sampler = FirstRowsSampler(10, first, first_samples=8, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    stream = [i for epoch in epochs for i in epoch]
    assert len(sampler) == 7 and all(len(e) == 7 for e in epochs)
    assert set(stream[:8]) <= set(first) and not set(stream[8:]) & set(first)
    assert sorted(stream[:6]) == [7, 7, 8, 8, 9, 9]  # each pass through the first rows holds each row once
    assert sorted(stream[8:15]) == list(range(7))  # the later rows' first pass, then a new shuffle
    resumed = FirstRowsSampler(10, first, first_samples=8, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == epochs[1]  # a resumed run draws the rows it would have drawn
    assert list(FirstRowsSampler(10, first, 0, seed=3)) and not set(FirstRowsSampler(10, first, 0)) & set(first)
    for outside in (10, -1):
        with pytest.raises(ValueError, match=f"first_rows must index the 10 training rows, got {outside}"):
            FirstRowsSampler(10, [outside, 3], 4)
    with pytest.raises(ValueError, match="first_samples=4 needs rows"):
        FirstRowsSampler(10, [], 4)
    with pytest.raises(ValueError, match="every training row"):
        FirstRowsSampler(2, [0, 1], 4)


def test_the_trainer_trains_its_first_steps_on_the_first_rows(mllm, codes, tmp_path):
    """`first_rows` / `first_steps` (the one-shape-first curriculum): the trainer's batches of the first steps come
    from those rows only, the later batches from the other rows."""
    from training.sft import _sft_trainer_class, unicode_sft_config

    model, processor = mllm
    train, _ = codes
    model = type(model).from_pretrained(_save(model, processor, tmp_path / "base"))  # the trainer patches its model
    rows = sft_rows(train.select(range(4)), model, processor)
    captions = [i for i, task in enumerate(rows["task"]) if task == "caption"]
    trainer = _sft_trainer_class()(
        model=model,
        args=unicode_sft_config(tmp_path / "t", max_steps=4, per_device_train_batch_size=2),
        train_dataset=rows,
        data_collator=CodesCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        first_rows=captions,
        first_steps=2,
    )
    caption_ids = {tuple(rows[i]["input_ids"]) for i in captions}
    batches = list(trainer.get_train_dataloader())
    drawn = [
        tuple(ids[mask.bool()].tolist()) in caption_ids
        for batch in batches
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]
    assert drawn[:4] == [True] * 4 and not any(drawn[4:])
    assert len(batches) == (len(rows) - len(captions) + 1) // 2


def test_curriculum_rows_are_the_one_shape_scenes_or_yes_no_conversations(codes):
    from training.data.shapes import scene_from_json
    from training.stage2 import curriculum_tasks

    train, _ = codes
    common = {
        "depth": 2,
        "questions_per_image": 4,
        "questions_per_conversation": 4,
        "tasks": ["caption", "vqa", "text_to_image"],
    }
    one_shape = curriculum_tasks("one_shape", train, None, seed=2, common=common)
    lone = {i for i, scene in enumerate(train["scene"]) if len(scene_from_json(scene)["objects"]) == 1}
    assert lone and set(one_shape["task"]) == {"caption", "vqa", "text_to_image"}
    assert sorted(map(tuple, one_shape[CODES_COLUMN])) == sorted(
        tuple(train[i][CODES_COLUMN]) for i in lone for _ in range(3)
    )  # a caption, a VQA conversation and a drawing of each one-shape scene, nothing of the others
    yes_no = curriculum_tasks("yes_no", train, None, seed=2, common=common)
    assert set(yes_no["task"]) == {"vqa"} and len(yes_no) == len(train)
    answers = [m["content"][0]["text"] for row in yes_no["messages"] for m in row if m["role"] == "assistant"]
    assert set(answers) == {"yes", "no"} and len(answers) >= 8 * len(train)
    with pytest.raises(ValueError, match="curriculum_rows='easy' is not one of"):
        curriculum_tasks("easy", train, None, seed=2, common=common)
