"""How many SFT steps does one kind of question take? Train the demo's MLLM on chosen VQA question
types only and print held-out accuracy as it learns.

    OMP_NUM_THREADS=1 python scripts/vqa_steps_probe.py --run outputs/demo-v13 --types color --single-shape
    OMP_NUM_THREADS=1 python scripts/vqa_steps_probe.py --run outputs/demo-v13 --types all --single-shape-first 300

It starts where the demo's SFT starts (`<run>/stage2/base`, decoder layers re-drawn as the `tiny` recipe's
`reinit_decoder` does, the embedding table = the codebook frozen) and trains only the decoder layers and the
final norm with a plain loop (AdamW, cosine schedule, gradient clipping at 1, batch 8, bf16 autocast unless
`--fp32`), on one-question rows in the evaluation's prompt format. Rows are the train split's scenes, codes
from the run's own visual tokenizer; test rows are test-split scenes.

Accuracy is multiple-choice on the answer's first token: the argmax over the first tokens of every answer
of the chosen types, at the position that predicts the answer. That isolates whether the image is read from
whether the answer is spelled out, and is cheap enough to print several times per run.

Why it exists: the demo's VQA stays near chance on colour, shape and existence. This probe separates "the
codes do not carry it" from "the LM does not get enough steps for it" (README, "Why the VQA and
text-to-image goals are not met").
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_unicode import token_ids_to_code_indices, unflatten_code_map  # noqa: E402
from training.codes import CODES_COLUMN, encode_image_dataset  # noqa: E402
from training.data.shapes import QUESTION_TYPES, build_split, scene_from_json  # noqa: E402
from training.sft import CodesCollator, reinitialize_decoder_layers  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402
from training.tasks import IGNORE_INDEX, ConversationTokenizer, _text, _turn, vqa_opening  # noqa: E402


def bag_of_codes(model, train, test, answers, types, weight_decay: float = 1e-3) -> dict:
    """Test accuracy per type of a multinomial logistic regression on code-id histograms."""
    vq = model.config.vq_config
    num_codes = len(model.model.codebook_token_ids)

    def features(rows):
        maps = unflatten_code_map(torch.tensor([r["image_codes"] for r in rows]), vq.code_grid_size, vq.depth)
        indices = token_ids_to_code_indices(maps, model.model.codebook_token_ids)  # (N, ĥ, ŵ, D) in 0..K-1
        per_level = [F.one_hot(indices[..., level].flatten(1), num_codes).sum(1) for level in range(vq.depth)]
        return torch.cat(per_level, dim=1).float()

    x, x_test = features(train), features(test)
    y = torch.tensor([answers.index(r["answer"]) for r in train])
    weights = torch.zeros(x.shape[1], len(answers), requires_grad=True)
    bias = torch.zeros(len(answers), requires_grad=True)
    solver = torch.optim.LBFGS([weights, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = F.cross_entropy(x @ weights + bias, y) + weight_decay * weights.pow(2).sum()
        loss.backward()
        return loss

    solver.step(closure)
    predicted = (x_test @ weights + bias).argmax(1).tolist()
    result = {"train_rows": len(train), "test_rows": len(test)}
    for kind in types:
        chosen = [i for i, r in enumerate(test) if r["type"] == kind]
        if chosen:
            result[kind] = round(sum(answers[predicted[i]] == test[i]["answer"] for i in chosen) / len(chosen), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a demo run folder (its stage2/base is the starting model)")
    parser.add_argument("--types", default="color", help="comma-separated question types, or 'all'")
    parser.add_argument("--single-shape", action="store_true", help="train and test on one-shape scenes only")
    parser.add_argument(
        "--single-shape-first",
        type=int,
        default=0,
        metavar="N",
        help="a curriculum: the first N steps draw rows of one-shape scenes only",
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--test-scenes", type=int, default=600)
    parser.add_argument("--reports", type=int, default=4, help="evaluations during the run")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument(
        "--question-first",
        action="store_true",
        help="the question before the image in the user turn (training and test rows): the answer then "
        "sits at a fixed offset from every image position, whatever the question's length",
    )
    parser.add_argument(
        "--bag-of-codes",
        action="store_true",
        help="instead of training the LM: a logistic regression from each image's code-id histogram "
        "(one per level) to the answer, on the same rows. It ignores the question, so it measures "
        "what the codes carry for questions whose answer the image alone fixes (one-shape colour)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    types = list(QUESTION_TYPES) if args.types == "all" else args.types.split(",")
    unknown = sorted(set(types) - set(QUESTION_TYPES))
    if unknown:
        raise SystemExit(f"--types {unknown} unknown; choose from {list(QUESTION_TYPES)} or 'all'")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, processor = load_model_and_processor(f"{args.run}/stage2/base")
    reinitialize_decoder_layers(model, seed=args.seed)
    conversation = ConversationTokenizer(processor)

    def rows(split: str, num_scenes: int) -> list[dict]:
        scenes = build_split(split, num_scenes)
        if args.single_shape:
            scenes = scenes.filter(lambda row: len(scene_from_json(row["scene"])["objects"]) == 1)
        coded = encode_image_dataset(scenes, model, desc=f"tokenizing {split} images")
        out = []
        for scene in coded:
            one_shape = len(scene_from_json(scene["scene"])["objects"]) == 1
            for qa in scene["questions"]:
                if qa["type"] in types:
                    layout = "question_first" if args.question_first else "image_first"
                    messages = vqa_opening(qa["question"], layout) + [_turn("assistant", _text(qa["answer"]))]
                    out.append(
                        {
                            **conversation(messages, scene[CODES_COLUMN]),
                            "answer": qa["answer"],
                            "type": qa["type"],
                            "single": one_shape,
                        }
                    )
        return out

    train, test = rows("train", args.train_scenes), rows("test", args.test_scenes)
    answers = sorted({r["answer"] for r in train + test})
    chance = {}  # the train split's commonest answer per type, scored on the test rows
    for kind in types:
        train_answers = [r["answer"] for r in train if r["type"] == kind]
        tested = [r["answer"] for r in test if r["type"] == kind]
        if train_answers and tested:
            commonest = max(set(train_answers), key=train_answers.count)
            chance[kind] = round(sum(a == commonest for a in tested) / len(tested), 3)
    if args.bag_of_codes:
        print(json.dumps({"bag_of_codes": bag_of_codes(model, train, test, answers, types), "chance": chance}))
        return
    # Each answer's first token as the rows label it, so the choice matches what training predicts.
    first_label = {r["answer"]: next(t for t in r["labels"] if t != IGNORE_INDEX) for r in train + test}
    first_tokens = [first_label[a] for a in answers]
    collate = CodesCollator(processor.tokenizer.pad_token_id)

    def hidden(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            return model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_codes=batch["image_codes"]
            ).last_hidden_state

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        hits, totals = {}, {}
        for start in range(0, len(test), 32):
            chunk = test[start : start + 32]
            batch = collate(chunk)
            states = hidden(batch)
            before_answer = (batch["labels"] != IGNORE_INDEX).float().argmax(1) - 1
            logits = model.lm_head(states[torch.arange(len(chunk)), before_answer].float())[:, first_tokens]
            for row, choice in zip(chunk, logits.argmax(1).tolist()):
                totals[row["type"]] = totals.get(row["type"], 0) + 1
                hits[row["type"]] = hits.get(row["type"], 0) + (answers[choice] == row["answer"])
        model.train()
        return {
            "overall": round(sum(hits.values()) / sum(totals.values()), 3),
            **{t: round(hits[t] / totals[t], 3) for t in types if t in totals},
        }

    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".layers." in name or name.endswith("language_model.norm.weight")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    easy = [i for i, r in enumerate(train) if r["single"]]
    if args.single_shape_first and not easy:
        raise SystemExit("--single-shape-first needs one-shape scenes among the train rows")
    everything = list(range(len(train)))
    model.train()
    started = time.time()
    print(
        json.dumps({"settings": vars(args), "train_rows": len(train), "test_rows": len(test), "chance": chance}),
        flush=True,
    )
    for step in range(1, args.steps + 1):
        pool = easy if step <= args.single_shape_first else everything
        batch = collate([train[i] for i in random.sample(pool, min(args.batch_size, len(pool)))])
        labels = batch["labels"][:, 1:]
        labelled = labels != IGNORE_INDEX
        loss = F.cross_entropy(model.lm_head(hidden(batch)[:, :-1][labelled].float()), labels[labelled])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // args.reports) == 0 or step == args.steps:
            print(
                json.dumps(
                    {
                        "step": step,
                        "seconds": round(time.time() - started),
                        "loss": round(loss.item(), 3),
                        "accuracy": evaluate(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
