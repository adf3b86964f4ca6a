"""VQA accuracy: normalised exact match, overall and per question type.

Normalisation (both sides): lower case, British spellings to American, punctuation dropped,
number words to digits, articles dropped, whitespace collapsed. So "Two." matches "2" and
"The Red" matches "red". An empty prediction is simply wrong.
"""

import re
import string

import datasets
import evaluate

_NUMBERS = {
    w: str(i)
    for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
}
_SPELLING = {"colour": "color", "grey": "gray", "centre": "center"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    words = _PUNCT.sub(" ", str(text).lower()).split()
    words = [_NUMBERS.get(_SPELLING.get(w, w), _SPELLING.get(w, w)) for w in words]
    return " ".join(w for w in words if w not in _ARTICLES)


class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=(
                "predictions: list of str; references: list of str; question_types (optional): list of "
                "str, one per example, adds accuracy_<type> and count_<type>"
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, question_types=None):
        if len(predictions) == 0:
            raise ValueError("predictions is empty; pass at least one prediction/reference pair")
        if question_types is not None and len(question_types) != len(predictions):
            raise ValueError(
                f"question_types must have one entry per prediction ({len(predictions)}), got {len(question_types)}"
            )
        hits = [
            normalize_answer(p) == normalize_answer(r) and normalize_answer(r) != ""
            for p, r in zip(predictions, references)
        ]
        result = {"accuracy": sum(hits) / len(hits), "num_examples": len(hits)}
        if question_types is not None:
            for kind in sorted(set(question_types)):
                chosen = [h for h, t in zip(hits, question_types) if t == kind]
                result[f"accuracy_{kind}"] = sum(chosen) / len(chosen)
                result[f"count_{kind}"] = len(chosen)
        return result
