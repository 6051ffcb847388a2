"""What each demo VLM is made of, and its untrained parts: tokenizer, processor and LLaVA config.

A demo model is a small LLaVA (CLIP-style vision tower + Llama) that speaks a shapes grammar,
built from code with no hub access. Prompts use the LLaVA-1.5 conversation format,
``{system} USER: <image>\\n{prompt} ASSISTANT:`` (v1 has no system prompt); the answer follows
after a space and ends with ``</s>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from elastic_ray.data import shapes, shapes_v2
from elastic_ray.data.shapes import Scene
from elastic_ray.models.loading import demo_dir

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
# LLaVA-1.5's system prompt ("conv_vicuna_v1"), before the image as in LLaVA.
LLAVA_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class DemoSpec:
    """One demo model: its data, prompt format, tokenizer and architecture."""

    name: str  # the name `elastic_ray.models.load` knows it by
    scene_rng: Callable[[int, str], np.random.Generator]  # (seed, split) -> the stream's generator
    scenes_from: Callable[[np.random.Generator, str], Iterator[Scene]]  # (generator, split) -> scenes
    image_size: int
    patch_size: int
    vocab_size: int
    system_prompt: str  # "" for none
    max_new_tokens: int  # covers the longest answer
    max_positions: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    corpus_scenes: int = 2000  # train scenes the tokenizer learns its merges from

    @property
    def out_dir(self) -> Path:
        """The model's folder in the package."""
        return demo_dir(self.name)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def prompt_template(self, system: bool = True) -> str:
        """The prompt with ``{prompt}`` for the instruction; `system=False` leaves out the system prompt."""
        head = self.system_prompt + " " if system and self.system_prompt else ""
        return head + "USER: " + IMAGE_TOKEN + "\n{prompt} ASSISTANT:"

    def format_prompt(self, instruction: str, system: bool = True) -> str:
        """The model's prompt for one instruction."""
        return self.prompt_template(system).format(prompt=instruction)

    def scenes(self, n: int, seed: int = 0, split: str = "train") -> list[Scene]:
        """The first `n` scenes of the (seed, split) stream of this model's data."""
        return list(islice(self.scenes_from(self.scene_rng(seed, split), split), n))

    @property
    def chat_template(self) -> str:
        """Renders `format_prompt` from chat messages, like the LLaVA-1.5 template."""
        system = f'{{{{ "{self.system_prompt} " }}}}' if self.system_prompt else ""
        return (
            system
            + "{% for message in messages %}"
            "{{ message['role'].upper() + ': ' }}"
            "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
            "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        )


DEMO_V1 = DemoSpec(
    name="demo", scene_rng=shapes.scene_rng, scenes_from=shapes.scenes_from,
    image_size=shapes.IMAGE_SIZE, patch_size=8, vocab_size=384, system_prompt="",
    max_new_tokens=48,  # a four-object caption is about 40 tokens
    max_positions=512, vision_hidden=128, vision_layers=3, text_hidden=192, text_layers=3, heads=4,
)
DEMO_V2 = DemoSpec(
    name="demo-v2", scene_rng=shapes_v2.detailed_scene_rng, scenes_from=shapes_v2.detailed_scenes_from,
    image_size=shapes_v2.IMAGE_SIZE, patch_size=16, vocab_size=512, system_prompt=LLAVA_SYSTEM_PROMPT,
    max_new_tokens=128,  # a four-object description with an occlusion is about 100 tokens
    max_positions=1024, vision_hidden=128, vision_layers=3, text_hidden=192, text_layers=6, heads=4,
)
SPECS = {spec.name: spec for spec in (DEMO_V1, DEMO_V2)}


def tokenizer_corpus(spec: DemoSpec) -> list[str]:
    """Sentences covering the grammar's vocabulary: prompts, captions (and descriptions), answers."""
    scenes = spec.scenes(spec.corpus_scenes, seed=0, split="train")
    questions = {q for s in scenes for q, _ in s.qa} | {i for s in scenes for i, _ in s.long_targets}
    answers = {a for s in scenes for _, a in s.qa}
    return list(chain(
        (spec.format_prompt(q) for q in sorted(questions)),
        (" " + text for s in scenes for _, text in s.long_targets),
        (" " + a for a in sorted(answers)),
    ))


def build_tokenizer(spec: DemoSpec) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the grammar; adds ``<s>`` in front and pads on the left."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(spec), trainer=trainer)
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
        chat_template=spec.chat_template,
    )


def build_processor(spec: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """CLIP-normalising PIL image processor + tokenizer; ``<image>`` expands to one token per patch."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=spec.chat_template,
    )


def build_config(spec: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA config: CLIP-style tower (CLS dropped, last layer's features) + a small Llama."""
    vision = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.heads,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=int(8 / 3 * spec.text_hidden),
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return config
