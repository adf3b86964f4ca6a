"""UniCode model library: configs, unified-codebook quantizers, visual tokenizer (and, as they land,
the MLLM, image processor and processor). Importing it registers every class with the Auto* factories.

Flat and self-contained (torch, transformers, numpy, PIL, stdlib, siblings) so its files ship
unchanged as Hub remote code.
"""

from transformers import AutoConfig, AutoModel

from .configuration_unicode import (
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    UniCodeVisualTokenizerConfig,
)
from .modeling_unicode_vq import UniCodeVisualTokenizer, UniCodeVisualTokenizerOutput
from .quantization_unicode import (
    UniCodeCodebookTrainer,
    UniCodeQuantizer,
    blend_ratio,
    code_indices_to_token_ids,
    embedding_rows,
    flatten_code_map,
    hq_pack,
    hq_unpack,
    nearest_code,
    non_code_token_ids,
    select_codebook_rows,
    token_ids_to_code_indices,
    unflatten_code_map,
    usage_statistics,
    write_embedding_rows,
)

AutoConfig.register(UniCodeVisualTokenizerConfig.model_type, UniCodeVisualTokenizerConfig, exist_ok=True)
AutoModel.register(UniCodeVisualTokenizerConfig, UniCodeVisualTokenizer, exist_ok=True)

__all__ = [name for name in dir() if not name.startswith("_") and name not in {"AutoConfig", "AutoModel"}]
