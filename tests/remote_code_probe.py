"""Run in a clean interpreter (`python -I`, cwd outside the repository, HF_HUB_OFFLINE=1 or a loopback
HF_ENDPOINT): load an exported UniCode model ONLY through remote code and print what it generates.

    python -I remote_code_probe.py MODEL_DIR_OR_REPO_ID IMAGE.png [--mllm-only]  ->  one JSON line on stdout

`--mllm-only`: a folder without the export's `vision_tokenizer/` (a run's `mllm/`).

This repository's packages are blocked at the import system, so the editable install of the
project cannot quietly stand in for the shipped code.
"""

import importlib.abc
import json
import sys

BLOCKED = {"modeling_unicode", "training", "hub_upload", "tests", "utils_mllm", "hub_fixtures", "configuration"}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{fullname} is blocked: the export must load from its own remote code")
        return None


def outputs(model, processor, backbone, vision, image) -> dict:
    """Greedy text ids, greedy guided image ids, the standalone tokenizer's codes and the backbone's
    hidden states for one image: the same calls on the original model give the reference."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=prompt)
    with torch.no_grad():
        # A random tiny model may end at once; min_new_tokens makes the comparison non-trivial.
        text_ids = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        image_inputs = processor(text="a red circle", generation_mode="image")
        image_ids = model.generate(**image_inputs, generation_mode="image", do_sample=False, guidance_scale=2.0)
        pixels = model.decode_image_tokens(image_ids)
        codes = (
            vision.encode(inputs["pixel_values"])
            if vision is not None
            else backbone.encode_images(inputs["pixel_values"])
        )
        hidden = backbone(**inputs).last_hidden_state
    return {
        "text_ids": text_ids.tolist(),
        "image_ids": image_ids.tolist(),
        "pixels_shape": list(pixels.shape),
        "vision_codes": codes.tolist(),
        "hidden_sum": float(hidden.double().sum()),
    }


def main(source: str, image_path: str) -> None:
    import PIL.Image
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    backbone = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    causal = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True)
    # A run's mllm/ has no standalone tokenizer beside it (an export does): its codes come from the MLLM.
    vision = (
        None
        if "--mllm-only" in sys.argv
        else AutoModel.from_pretrained(source, subfolder="vision_tokenizer", trust_remote_code=True).eval()
    )
    result = outputs(model, processor, backbone, vision, PIL.Image.open(image_path))
    print(
        json.dumps(
            {
                "model_class": type(model).__name__,
                "model_module": type(model).__module__,
                "processor_class": type(processor).__name__,
                "image_processor_class": type(processor.image_processor).__name__,
                "backbone_class": type(backbone).__name__,
                "causal_class": type(causal).__name__,
                "vision_class": type(vision or backbone.vision_tokenizer).__name__,
                "vision_module": type(vision or backbone.vision_tokenizer).__module__,
                "blocked_loaded": sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED),
                **result,
            }
        )
    )


if __name__ == "__main__":
    # Only when run as the clean interpreter: the test process imports `outputs` for the reference.
    sys.meta_path.insert(0, _Block())
    main(sys.argv[1], sys.argv[2])
