"""How spread out a run's code rows are, against its text rows (the learning issue's "code rows that are spread out").

    python scripts/code_row_spread.py <run folder> [<run folder> ...]

Reads `<run>/stage2/base` (the stage-0 LLM with the stage-I codebook, before any stage-II training) and prints per
run, for the codebook rows and for the other rows of the embedding table:
- mean fraction: the squared length of the rows' mean over their mean squared length. Near 1, every row is mostly
  one shared direction (a tied softmax pushes the rows it never emits along one direction);
- effective rank: exp of the entropy of the centred rows' normalised squared singular values;
- the rows' mean length;
and, for the Shapes world's colour words and shape words (the rows a question names an object with), their mean
pairwise cosine and the share of a row's length that tells the words of a kind apart (the centred row's length over
the row's): a question's comparison with the image can only use that share (docs/results.md, "Five hundred
scenes").
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.shapes import COLORS, SHAPES  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402


def spread(rows):
    mean = rows.mean(0)
    fraction = float(mean.norm() ** 2 / (rows.norm(dim=1) ** 2).mean())
    energy = torch.linalg.svdvals(rows - mean) ** 2
    share = energy / energy.sum()
    effective_rank = float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))
    return {
        "rows": len(rows),
        "mean_fraction": fraction,
        "effective_rank": effective_rank,
        "mean_length": float(rows.norm(dim=1).mean()),
    }


def word_rows(table, tokenizer, words) -> dict:
    """Mean pairwise cosine of the words' rows (each word's first token as a question writes it) and the share of
    a row's length that is not the words' common mean."""
    rows = torch.stack([table[tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]] for word in words])
    unit = torch.nn.functional.normalize(rows, dim=1)
    cosines = (unit @ unit.T)[~torch.eye(len(words), dtype=torch.bool)]
    share = (rows - rows.mean(0)).norm(dim=1).mean() / rows.norm(dim=1).mean()
    return {"cosine": float(cosines.mean()), "distinct_share": float(share)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders of `unicode-mllm demo` (with stage2/base)")
    args = parser.parse_args()

    for run in args.runs:
        model, processor = load_model_and_processor(Path(run) / "stage2" / "base")
        table = model.get_input_embeddings().weight.detach().float()
        is_code = torch.zeros(len(table), dtype=torch.bool)
        is_code[torch.as_tensor(model.config.vq_config.codebook_token_ids)] = True
        for name, rows in (("code rows", table[is_code]), ("text rows", table[~is_code])):
            figures = spread(rows)
            print(
                f"{run}  {name}: {figures['rows']} rows, mean fraction {figures['mean_fraction']:.3f}, "
                f"effective rank {figures['effective_rank']:.1f}, mean length {figures['mean_length']:.3f}"
            )
        for name, words in (("colour words", COLORS), ("shape words", SHAPES)):
            figures = word_rows(table, processor.tokenizer, list(words))
            print(
                f"{run}  {name}: mean cosine {figures['cosine']:.3f}, distinct share {figures['distinct_share']:.3f}"
            )


if __name__ == "__main__":
    main()
