"""Offline builders for the bundled demo VLM: tokenizer, processor and an untrained LLaVA.

The demo model is a small LLaVA (CLIP-style vision tower + Llama) that speaks the "shapes"
grammar. Everything here is built from code, with no hub access. Prompts use the LLaVA-1.5
conversation format, ``USER: <image>\\n{prompt} ASSISTANT:``; the answer follows after a space
and ends with ``</s>``.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from elastic_ray.data.shapes import CAPTION_INSTRUCTION, IMAGE_SIZE, make_scenes

DEMO_DIR = Path(__file__).with_name("demo")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PROMPT_TEMPLATE = "USER: " + IMAGE_TOKEN + "\n{prompt} ASSISTANT:"
PATCH_SIZE = 8
VOCAB_SIZE = 384
MAX_NEW_TOKENS = 48  # a four-object caption is about 40 tokens
# Renders PROMPT_TEMPLATE from chat messages, like the LLaVA-1.5 template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def format_prompt(instruction: str) -> str:
    """The demo model's prompt for one instruction."""
    return PROMPT_TEMPLATE.format(prompt=instruction)


def tokenizer_corpus(n_scenes: int = 2000) -> list[str]:
    """Sentences covering the grammar's vocabulary: prompts, captions, questions and answers."""
    scenes = make_scenes(n_scenes, seed=0, split="train")
    questions = {q for s in scenes for q, _ in s.qa} | {CAPTION_INSTRUCTION}
    answers = {a for s in scenes for _, a in s.qa}
    return list(chain(
        (format_prompt(q) for q in sorted(questions)),
        (" " + s.caption for s in scenes),
        (" " + a for a in sorted(answers)),
    ))


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the grammar; adds ``<s>`` in front and pads on the left."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = IMAGE_SIZE) -> LlavaProcessor:
    """CLIP-normalising PIL image processor + tokenizer; ``<image>`` expands to one token per patch."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = IMAGE_SIZE,
    vision_hidden: int = 128,
    vision_layers: int = 3,
    text_hidden: int = 192,
    text_layers: int = 3,
    heads: int = 4,
) -> LlavaConfig:
    """LLaVA config: CLIP-style tower (CLS dropped, last layer's features) + a small Llama."""
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=int(8 / 3 * text_hidden),
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return config
