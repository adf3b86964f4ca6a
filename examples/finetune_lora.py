"""Fine-tune a UniCode model with LoRA on your own images and conversations.

    python examples/finetune_lora.py --model outputs/tiny/mllm --dataset my_data/ --output my_lora/ --merge

`--model` is a UniCode folder or Hub repo id (loaded with trust_remote_code=True). The dataset is a
`save_to_disk` folder, a JSON/JSONL file or a Hub dataset with an `image` column and either
`messages` (a conversation with one {"type": "image"} item) or `caption` (text-to-image rows); see
training/finetune.py and the README. Same as `unicode-mllm finetune ...`.
"""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
