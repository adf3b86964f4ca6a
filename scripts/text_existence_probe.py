"""Can the tiny recipe's stage-II language model learn the existence comparison from text alone, with no image?

    python scripts/text_existence_probe.py <run folder> [--steps 2000] [--learning-rate 5e-4] [--batch-size 16]
        [--decoder-layers 2] [--redraw-word-rows] [--answer-only] [--every 250] [--redraw-text-rows]
        [--all-text-rows] [--fp32] [--scale-rows F]

Builds the model stage II starts from (`<run>/stage2/base`: an untied head that trains, 2 fresh decoder layers, the
colour and shape words' rows trainable, as `configuration/recipes/tiny.yaml` does) and trains it on conversations
with no image: "Describe this image." answered by one of a train scene's captions, then "Is there a <colour>
<shape>?" answered yes or no (even odds, `shapes.yes_no_questions`). Every `--every` steps it prints the accuracy on
300 held-out test-scene conversations, read as logit(" yes") > logit(" no") at the answer. The caption holds every
word the question asks about, so the comparison is between words only. `--redraw-word-rows` first re-draws the
eleven words' rows at random (same lengths), away from the directions stage 0 left them in
(docs/results.md, "Describe, then answer"). `--answer-only` supervises the yes/no answer alone, not the caption, whose
words (unpredictable without the image) otherwise make up most of the loss.

What else the rows are measured with (docs/results.md, "Text rows drawn afresh"): `--redraw-text-rows` re-draws
every row that is not a visual code (`sft.redraw_text_rows`, the recipe option); `--all-text-rows` trains every text
row, not only the eleven words'; `--scale-rows` multiplies the whole table; `--fp32` trains without bf16 autocast.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import templates  # noqa: E402
from training.data.shapes import COLORS, SHAPES, make_example, yes_no_questions  # noqa: E402
from training.sft import (  # noqa: E402
    CodesCollator,
    prepare_full_finetune,
    redraw_text_rows,
    reinitialize_decoder_layers,
    untie_output_head,
    word_row_ids,
)
from training.stage2 import load_model_and_processor  # noqa: E402
from training.tasks import IGNORE_INDEX, ConversationTokenizer, _text, _turn  # noqa: E402


def conversation_of(tokenize, split: str, index: int, rng: np.random.Generator, image_size: int) -> dict:
    example = make_example(0, split, index, image_size=image_size)
    asked = yes_no_questions(example["scene"], "existence", 1, rng)[0]
    caption = example["captions"][int(rng.integers(len(example["captions"])))]
    messages = [
        _turn("user", _text(templates.CAPTION[0])),
        _turn("assistant", _text(caption)),
        _turn("user", _text(asked["question"])),
        _turn("assistant", _text(asked["answer"])),
    ]
    return {**tokenize(messages, []), "answer": asked["answer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--redraw-word-rows", action="store_true")
    parser.add_argument("--answer-only", action="store_true")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--all-text-rows", action="store_true")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--redraw-text-rows", action="store_true")
    parser.add_argument("--scale-rows", type=float, default=1.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = load_model_and_processor(args.run / "stage2" / "base")
    table = model.get_input_embeddings().weight
    if args.redraw_text_rows:
        redraw_text_rows(model, seed=0)
    if args.scale_rows != 1.0:
        with torch.no_grad():
            table.mul_(args.scale_rows)
    untie_output_head(model)
    reinitialize_decoder_layers(model, seed=0, num_layers=args.decoder_layers)
    words = word_row_ids(processor.tokenizer, list(COLORS) + list(SHAPES))
    if args.redraw_word_rows:
        with torch.no_grad():
            fresh = torch.randn(len(words), table.shape[1])
            table[words] = fresh / fresh.norm(dim=-1, keepdim=True) * table[words].norm(dim=-1, keepdim=True)
    prepare_full_finetune(model, text_rows=True if args.all_text_rows else words)
    tokenize = ConversationTokenizer(processor)
    tokenizer = processor.tokenizer
    collate = CodesCollator(tokenizer.pad_token_id)
    yes, no = (tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in ("yes", "no"))

    def answer_at(row: dict) -> int:
        """Where the row's yes/no answer token stands."""
        return max(j for j, label in enumerate(row["labels"]) if label in (yes, no))

    size = model.config.vq_config.image_size
    held_out = [conversation_of(tokenize, "test", i, np.random.default_rng(1000 + i), size) for i in range(300)]

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        right = 0
        for start in range(0, len(held_out), 50):
            chunk = held_out[start : start + 50]
            batch = collate(chunk)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for k, row in enumerate(chunk):
                at = answer_at(row) - 1
                right += ("yes" if logits[k, at, yes] > logits[k, at, no] else "no") == row["answer"]
        model.train()
        return right / len(held_out)

    yes_share = sum(row["answer"] == "yes" for row in held_out) / len(held_out)
    base_rate = max(yes_share, 1 - yes_share)
    print(f"held-out base rate {base_rate:.3f}; step 0 accuracy {accuracy():.3f}", flush=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = [conversation_of(tokenize, "train", int(rng.integers(8000)), rng, size) for _ in range(args.batch_size)]
        if args.answer_only:
            for row in rows:
                answer = answer_at(row)
                row["labels"] = [IGNORE_INDEX] * answer + list(row["labels"][answer:])
        batch = collate(rows)
        text_only = {name: batch[name] for name in ("input_ids", "attention_mask", "labels")}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            loss = model(**text_only).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.every == 0 or step == args.steps:
            seconds = time.perf_counter() - started
            print(f"step {step}: loss {loss.item():.3f}, accuracy {accuracy():.3f} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
