"""Randomly initialised VLMs with offline tokenizers and processors: for tests and throughput runs."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from elastic_ray.models.loading import image_only_processor

# The shape of Qwen2-VL's own template, reduced to what a single-image user turn needs.
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} :"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %} {{ part['text'] }}{% endif %}{% endfor %}"
    " ;{% endfor %}{% if add_generation_prompt %} assistant :{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "user assistant describe the image . : , ? a an of in on at is are what where how many color shape "
    "red green blue yellow circle square triangle left right top bottom center small large and"
).split()


def word_tokenizer(extra_specials: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary, padded to `vocab_size` ids; pads on the left."""
    vocab = SPECIALS + extra_specials + WORDS
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={name: tok for name, tok in zip(("image_token", "video_token"), extra_specials)},
    )


def random_llava(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab_size: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A LLaVA-1.5-shaped model with random weights, and its processor. (image/patch)^2 image tokens.

    Built directly on `device` in `dtype`, so a 7B shape never exists in float32 on the host."""
    tokenizer = word_tokenizer(["<image>"], vocab_size)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


def random_qwen2_vl(*, version: str = "2", attn_implementation: str = "sdpa", seed: int = 0, **text):
    """A Qwen2-VL or Qwen2.5-VL-shaped model (GQA, M-RoPE) with random weights, and its processor."""
    tokenizer = word_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"], 160)
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    ) | text
    vision = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision |= dict(embed_dim=32, hidden_size=text_config["hidden_size"], mlp_ratio=2)
    else:
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=text_config["hidden_size"],
                       window_size=56, fullatt_block_indexes=[1])
    config = config_cls(
        text_config=text_config, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4)
    processor = image_only_processor(config.model_type)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )
    return model, processor
