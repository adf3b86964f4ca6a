"""Prompt templates of the stage-II tasks, all in one place (the paper samples one per example).

The first text-to-image template is the processor's `DEFAULT_IMAGE_GENERATION_TEMPLATE`, and a
dropped caption always uses it with `caption=""`: that is exactly the unconditional prompt
`UniCodeProcessor(..., generation_mode="image")` builds for classifier-free guidance. The first caption request
is the processor's `DESCRIBE_REQUEST`, the one a "describe_first" model is asked first.
"""

from modeling_unicode.processing_unicode import DEFAULT_IMAGE_GENERATION_TEMPLATE, DESCRIBE_REQUEST

TEXT_TO_IMAGE = (
    DEFAULT_IMAGE_GENERATION_TEMPLATE,
    "Draw a picture of this: '{caption}'.",
    "Create an image that shows {caption}.",
    "Generate a picture: {caption}.",
    "Please paint an image of {caption}.",
    "Show me an image where {caption}.",
    "Render this scene: {caption}.",
    "Make an image matching the description '{caption}'.",
    "Can you draw {caption}?",
    "Produce a picture based on the caption: {caption}.",
)

CAPTION = (
    DESCRIBE_REQUEST,  # the first: the request a "describe_first" conversation opens with
    "What is in this picture?",
    "Write a short caption for the image.",
    "Describe the scene briefly.",
    "What does the image show?",
    "Give a one-sentence description of this picture.",
)

# VQA keeps the question as asked; the wrapper varies how it is posed.
VQA = (
    "{question}",
    "{question} Answer briefly.",
    "Answer the question about the image: {question}",
    "Look at the picture. {question}",
)

DECOMPRESS_FIRST = (
    "Decompress this image into its codes.",
    "Write out the full code sequence of this image.",
    "Expand the compressed image into codes.",
    "List the visual codes of this image.",
)
DECOMPRESS_NEXT = ("Continue.", "Next part.", "Go on.", "Continue the codes.")

CONTINUE_IMAGE = (
    "Continue this image of '{caption}':",
    "Here is the beginning of a picture of {caption}. Continue it:",
    "Complete the next part of this image ({caption}):",
    "This partial image shows {caption}. Write the next codes:",
)

__all__ = ["TEXT_TO_IMAGE", "CAPTION", "VQA", "DECOMPRESS_FIRST", "DECOMPRESS_NEXT", "CONTINUE_IMAGE"]
