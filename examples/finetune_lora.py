"""Fine-tune a UniCode model with LoRA on your own images and conversations.

    python examples/finetune_lora.py --model outputs/demo-tiny/mllm --dataset my_photos/ --output my_finetune/ --merge

`--model` is a UniCode folder or Hub repo id. `--dataset` is an imagefolder (`metadata.jsonl` / `metadata.csv` with
`file_name` and a text column), a JSON/JSONL/CSV file of image paths, a `save_to_disk` folder or a Hub dataset name;
rows hold an image and either `messages` (a conversation with one {"type": "image"} item) or a text (text-to-image
rows; `--text-column`). See training/finetune.py and the README. Same as `unicode-mllm finetune ...`.
"""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
