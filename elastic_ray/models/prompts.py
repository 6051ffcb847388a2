"""Turn a request (image + instruction) into the model's prompt text and processor inputs."""

from PIL import Image

LLAVA_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"
TEXT_TOKENS = 256  # text a prompt may add to its image tokens when no limit is configured


def build_prompt(processor, instruction: str) -> str:
    """The processor's chat template when it has one, else the LLaVA-1.5 conversation format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return LLAVA_FORMAT.format(prompt=instruction)


def check_request(request) -> tuple[Image.Image, str]:
    """The request's (RGB image, instruction); anything else raises ValueError."""
    if not isinstance(request, dict):
        raise ValueError(f"a request must be a dict with 'image' and 'prompt', got {type(request).__name__}")
    image, prompt = request.get("image"), request.get("prompt")
    if not isinstance(image, Image.Image):
        raise ValueError(f"'image' must be a PIL image, got {type(image).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    return image.convert("RGB"), prompt


def encode_requests(processor, requests: list[dict]) -> dict:
    """Processor inputs (left-padded when several); a bad request raises ValueError naming its index."""
    checked = []
    for index, request in enumerate(requests):
        try:
            checked.append(check_request(request))
        except ValueError as error:
            raise ValueError(f"request {index}: {error}") from None
    return processor(
        images=[image for image, _ in checked],
        text=[build_prompt(processor, prompt) for _, prompt in checked],
        return_tensors="pt",
        padding=True,
    )


def default_prompt_tokens(model) -> int:
    """Prompt length a slot is sized for when the engine is given none: image tokens + TEXT_TOKENS."""
    image_tokens = getattr(model.config, "image_seq_length", None)
    if image_tokens is None:  # Qwen-VL: images vary in size; size for a 448 x 448 image
        vision = model.config.vision_config
        image_tokens = (448 // vision.patch_size // vision.spatial_merge_size) ** 2
    return image_tokens + TEXT_TOKENS
