"""Data sources: the Shapes world (procedural, exact scene graphs), its scene parser, offline
real images (Fashion-MNIST, scikit-image samples) and adapters for Hugging Face datasets."""

from .real_images import (
    ACCEPTED_LAYOUTS,
    FASHION_MNIST_LABELS,
    fashion_mnist_available,
    load_caption_dataset,
    load_conversation_dataset,
    load_fashion_mnist,
    load_image_dataset,
    load_skimage_images,
)
from .scene_parser import degrade_image, parse_scene
from .shapes import (
    CAPTION_TEMPLATES,
    COLORS,
    POSITIONS,
    QUESTION_TEMPLATES,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SPLITS,
    ShapesWorldConfig,
    build_shapes_world,
    canonical_objects,
    caption_for_scene,
    captions_for_scene,
    load_shapes_world,
    make_example,
    questions_for_scene,
    render_scene,
    sample_scene,
    scene_from_caption,
    scene_request,
    shapes_world_fingerprint,
    text_corpus,
)
