"""Codebook usage of a visual tokenizer: unique codes / K and the perplexity of code use.

predictions: one list of code ids per image (any ids: vocabulary ids work, only equality
matters). codebook_size: K. Perplexity = exp(entropy of the code histogram); it equals K when
every code is used equally often and 1 when a single code is used.
"""

import datasets
import evaluate
import numpy as np


class CodebookUsage(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of lists of int code ids; codebook_size: int K (keyword)",
            features=datasets.Features({"predictions": datasets.List(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, codebook_size=None):
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive int (the K of the codebook), got {codebook_size!r}")
        codes = np.concatenate([np.asarray(p, dtype=np.int64) for p in predictions]) if predictions else np.zeros(0)
        if codes.size == 0:
            raise ValueError("predictions hold no codes; pass the code ids of at least one image")
        _, counts = np.unique(codes, return_counts=True)
        if len(counts) > codebook_size:
            raise ValueError(f"{len(counts)} distinct codes exceed codebook_size={codebook_size}; pass the right K")
        probs = counts / counts.sum()
        perplexity = float(np.exp(-(probs * np.log(probs)).sum()))
        return {
            "unique_codes": int(len(counts)),
            "usage": len(counts) / codebook_size,
            "perplexity": perplexity,
            "normalized_perplexity": perplexity / codebook_size,
            "num_codes": int(codes.size),
        }
