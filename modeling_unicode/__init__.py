"""UniCode model library: configs, unified-codebook quantizers, visual tokenizer, the MLLM, image
processor and processor. Importing it registers every class with the Auto* factories.

Flat and self-contained (torch, transformers, numpy, PIL, stdlib, siblings) so its files ship
unchanged as Hub remote code.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_unicode import (
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    UniCodeConfig,
    UniCodeVisualTokenizerConfig,
    add_image_special_tokens,
    check_adapter_size,
    image_placeholder_count,
)
from .image_processing_unicode import UniCodeImageProcessor
from .modeling_unicode import (
    ADDED_MODULES,
    UniCodeCausalLMOutputWithPast,
    UniCodeForConditionalGeneration,
    UniCodeImageFeaturesOutput,
    UniCodeImageInputAdapter,
    UniCodeImageSpanLogitsProcessor,
    UniCodeModel,
    UniCodeModelOutputWithPast,
    UniCodePreTrainedModel,
)
from .modeling_unicode_vq import UniCodeVisualTokenizer, UniCodeVisualTokenizerOutput
from .processing_unicode import UniCodeProcessor
from .quantization_unicode import (
    UniCodeCodebookLearning,
    UniCodeCodebookTrainer,
    UniCodeQuantizer,
    blend_ratio,
    code_indices_to_token_ids,
    embedding_rows,
    flatten_code_map,
    hq_pack,
    hq_unpack,
    image_input_embeddings,
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
AutoConfig.register(UniCodeConfig.model_type, UniCodeConfig, exist_ok=True)
AutoModel.register(UniCodeConfig, UniCodeModel, exist_ok=True)
for _auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
    _auto.register(UniCodeConfig, UniCodeForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(UniCodeConfig, image_processor_classes={"pil": UniCodeImageProcessor}, exist_ok=True)
AutoProcessor.register(UniCodeConfig, UniCodeProcessor, exist_ok=True)

_AUTO = {
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMultimodalLM",
    "AutoImageProcessor",
    "AutoProcessor",
}
__all__ = [name for name in dir() if not name.startswith("_") and name not in _AUTO]
