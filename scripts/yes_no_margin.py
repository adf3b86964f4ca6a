"""Whether an MLLM's yes/no answers depend on the image: the margin logit(" yes") - logit(" no") at the answer.

    python scripts/yes_no_margin.py <mllm folder> [<mllm folder> ...] [--scenes 150]

On test-split scenes, for every existence and relation question, the margin where the answer's first token is
scored, grouped by the true answer and, for existence, by whether the scene holds a shape of the asked colour.
A model that compares the question with the image gives "yes" questions a higher margin than "no" questions; a mean
margin that is the same in every group, with a spread that does not separate them, says the answer is a coin whose
bias does not depend on the image (docs/results.md, "What the LLM reads").
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_model_report import run_over_models  # noqa: E402

from training.data.shapes import YES_NO_TYPES, make_example, scene_from_json  # noqa: E402
from training.evaluation import vqa_prompt  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402


def answer_token(tokenizer, word: str) -> int:
    """The first token of the answer as the VQA rows write it (after the assistant prefix)."""
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def margins(path: str, num_scenes: int) -> dict:
    model, processor = load_model_and_processor(path)
    model.eval()
    yes, no = (answer_token(processor.tokenizer, word) for word in ("yes", "no"))
    size = model.config.vq_config.image_size
    groups: dict[str, list[float]] = {}
    for index in range(num_scenes):
        example = make_example(0, "test", index, image_size=size)
        colours = {o["color"] for o in scene_from_json(example["scene"])["objects"]}
        for qa in example["questions"]:
            if qa["type"] not in YES_NO_TYPES:
                continue
            inputs = processor(
                text=[vqa_prompt(processor, qa["question"])], images=[example["image"]], return_tensors="pt"
            )
            logits = model(**inputs).logits[0, -1].float()
            group = f"{qa['type']} {qa['answer']}"
            if qa["type"] == "existence":
                asked_present = any(word in colours for word in qa["question"].rstrip("?").split())
                group += ", asked colour " + ("in the scene" if asked_present else "absent")
            groups.setdefault(group, []).append(float(logits[yes] - logits[no]))
    result = {}
    for group, values in sorted(groups.items()):
        values = torch.tensor(values)
        result[group] = {"n": float(len(values)), "mean": float(values.mean()), "std": float(values.std())}
    return result


if __name__ == "__main__":
    run_over_models(__doc__, margins, default_scenes=150)
