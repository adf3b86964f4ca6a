"""Text-to-image scene match: does a generated image show the requested scene?

predictions: generated images (PIL or uint8 HxWx3 arrays). references: the requested scene, as
a JSON scene graph or a caption (any Shapes world caption phrasing). Each image goes through
the Shapes world scene parser; requested objects are matched one-to-one to parsed objects
(fewest disagreeing attributes), then:

- color / shape / size / position: fraction of requested objects whose match agrees
  (a requested object with no match is wrong on all four);
- count: fraction of images with as many objects as requested;
- all_correct: fraction of images whose parsed scene equals the request exactly;
- unparseable: fraction of images the parser refused (they count as wrong everywhere).
"""

import datasets
import evaluate
import numpy as np
from scipy.optimize import linear_sum_assignment

ATTRIBUTES = ("color", "shape", "size", "position")


def _match(requested, parsed):
    """Pairs (i, j) minimising attribute disagreements; scipy's assignment is exact and cheap."""
    if not requested or not parsed:
        return []
    cost = np.array([[sum(r[a] != p[a] for a in ATTRIBUTES) for p in parsed] for r in requested])
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows.tolist(), cols.tolist()))


class SceneMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: generated images; references: JSON scene graphs or captions (str)",
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        try:  # here, not at the top: evaluate runs a copy of this file, where `training` may not import
            from training.data.scene_parser import parse_scene
            from training.data.shapes import canonical_objects, scene_request
        except ImportError as error:
            raise ImportError(
                "scene_match needs the unicode-mllm `training` package importable: `pip install -e .` in the "
                f"repository or run from its root ({error})"
            ) from None
        if len(predictions) == 0:
            raise ValueError("predictions is empty; pass at least one generated image")
        hits = {a: 0 for a in ATTRIBUTES}
        total_objects = count_ok = all_ok = unparseable = 0
        for image, reference in zip(predictions, references):
            request = scene_request(reference, image_size=image.size[0])
            requested = request["objects"]
            total_objects += len(requested)
            parsed = parse_scene(image)
            if parsed is None:
                unparseable += 1
                continue
            found = parsed["objects"]
            for i, j in _match(requested, found):
                for a in ATTRIBUTES:
                    hits[a] += requested[i][a] == found[j][a]
            count_ok += len(found) == len(requested)
            all_ok += canonical_objects(parsed) == canonical_objects(request)
        n = len(predictions)
        result = {a: hits[a] / max(total_objects, 1) for a in ATTRIBUTES}
        result.update(count=count_ok / n, all_correct=all_ok / n, unparseable=unparseable / n, num_images=n)
        return result
