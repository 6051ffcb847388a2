"""Turn a request (image + instruction) into the model's prompt text and processor inputs."""

import functools
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

LLAVA_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"
TEXT_TOKENS = 256  # text a prompt may add to its image tokens when no limit is configured
# Unicode normalisation (NFC, NFKC), which a tokenizer may apply first, joins at most four code
# points into one character (U+1F82 is the longest canonical decomposition).
CHARS_JOINED = 4
# Characters a token is taken to stand for at most when the vocabulary does not bound it.
UNBOUNDED_TOKEN_CHARS = 64


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


@dataclass(frozen=True)
class PreparedRequest:
    """A request after the processor: one prompt's model inputs (batch 1) and its length.

    Made by `prepare_request` on any thread or process (CPU workers, a server's request
    threads), so the engine's own thread never runs the processor.
    """

    inputs: dict[str, Tensor]
    prompt_tokens: int


@functools.lru_cache(maxsize=8)
def longest_token_chars(tokenizer) -> int | None:
    """The most characters of text one token can stand for: the longest vocabulary entry (added
    tokens too) for a BPE vocabulary, whose unknown characters become byte tokens or one token
    each; None where an unknown token can stand for any length of text (a word-level, WordPiece
    or Unigram vocabulary, or BPE fusing unknown characters into one token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ != "BPE" or (model.unk_token and model.fuse_unk and not model.byte_fallback):
        return None
    return max(map(len, tokenizer.get_vocab()))


def max_instruction_chars(processor, max_prompt_tokens: int) -> int:
    """The longest instruction that may fit in `max_prompt_tokens`. Where a token stands for at most
    `longest_token_chars` characters of the normalised text, and normalisation joins at most
    CHARS_JOINED characters into one, a longer instruction has more tokens than the limit whatever
    it says. Where no vocabulary bound exists, UNBOUNDED_TOKEN_CHARS a token is the rule."""
    chars = longest_token_chars(processor.tokenizer)
    return max_prompt_tokens * (UNBOUNDED_TOKEN_CHARS if chars is None else chars * CHARS_JOINED)


def check_instruction_length(processor, prompt: str, max_prompt_tokens: int) -> None:
    """Refuse, before any tokenising, an instruction that cannot fit the prompt limit (ValueError)."""
    limit = max_instruction_chars(processor, max_prompt_tokens)
    if len(prompt) > limit:
        raise ValueError(f"the instruction has {len(prompt)} characters, more than a prompt of at most "
                         f"{max_prompt_tokens} tokens can hold ({limit}; EngineConfig.max_prompt_tokens)")


def prepare_request(processor, request, max_prompt_tokens: int | None = None) -> PreparedRequest:
    """Check a request and run the processor on it; a bad request, or a prompt over
    `max_prompt_tokens` (an instruction too long for it is refused before tokenising), raises ValueError."""
    if isinstance(request, PreparedRequest):
        prepared = request
    else:
        image, prompt = check_request(request)
        if max_prompt_tokens is not None:
            check_instruction_length(processor, prompt, max_prompt_tokens)
        inputs = dict(processor(images=[image], text=[build_prompt(processor, prompt)], return_tensors="pt"))
        prepared = PreparedRequest(inputs, int(inputs["attention_mask"].sum()))
    if max_prompt_tokens is not None and prepared.prompt_tokens > max_prompt_tokens:
        raise ValueError(
            f"the prompt has {prepared.prompt_tokens} tokens, over the engine's limit of {max_prompt_tokens} "
            "(EngineConfig.max_prompt_tokens)"
        )
    return prepared


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


def prompt_limit(model_config, max_tokens: int, max_prompt_tokens: int | None = None) -> int:
    """The longest prompt an engine takes: `max_prompt_tokens` when given, else what a slot is
    sized for by default (the model's image tokens + TEXT_TOKENS) within what the context leaves
    after `max_tokens`. Needs only the model's config, so CPU workers check prompts without the model."""
    if max_prompt_tokens is not None:
        return max_prompt_tokens
    image_tokens = getattr(model_config, "image_seq_length", None)
    if image_tokens is None:  # Qwen-VL: images vary in size; size for a 448 x 448 image
        vision = model_config.vision_config
        image_tokens = (448 // vision.patch_size // vision.spatial_merge_size) ** 2
    context = model_config.get_text_config().max_position_embeddings
    return min(image_tokens + TEXT_TOKENS, context - max_tokens)
