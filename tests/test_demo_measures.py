"""The demo measures: attention shares and key cosines checked against cases with a known
answer, and full-cache quality on the shipped model."""

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from elastic_ray.data.shapes import CAPTION_INSTRUCTION
from elastic_ray.demo.build import DEMO_V1, build_config, build_processor, build_tokenizer
from elastic_ray.demo.probes import attention_shares, key_redundancy
from elastic_ray.demo.quality import load_demo, score
from elastic_ray.models.loading import demo_dir
from elastic_ray.models.prompts import build_prompt


@pytest.fixture(scope="module")
def tiny():
    """A random v1-format model (eager attention) and its processor."""
    spec = replace(DEMO_V1, vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2)
    processor = build_processor(spec, build_tokenizer(spec))
    config = build_config(spec, processor.tokenizer)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


def test_uniform_attention_gives_each_region_its_share_of_the_keys(tiny):
    """With zero queries every query attends uniformly to the keys it can see: the query at
    position t gives 1/(t+1) to each, which fixes every region's share."""
    model, processor = tiny
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
    image = Image.new("RGB", (112, 112), (90, 20, 200))
    shares = attention_shares(model, processor, [image], [CAPTION_INSTRUCTION], max_new_tokens=1)
    ids = processor(images=[image], text=[build_prompt(processor, CAPTION_INSTRUCTION)])["input_ids"][0]
    start = ids.index(model.config.image_token_id)
    end = start + 196
    queries = range(end, len(ids) + 1)  # the prompt after the image and the one generated token
    expected = {"bos": 1, "before_image": start - 1, "image": 196}
    for layer in shares:
        for region, keys in expected.items():
            assert layer[region] == pytest.approx(sum(keys / (t + 1) for t in queries) / len(queries), abs=1e-5)
        assert sum(layer[r] for r in ("bos", "before_image", "image", "after_image")) == pytest.approx(1, abs=1e-5)
        assert layer["bos_max_head"] == pytest.approx(layer["bos"], abs=1e-5)


def test_identical_image_tokens_have_key_cosines_set_by_rope(tiny):
    """A flat image without position embeddings makes all 196 image tokens the same vector: the
    layer-0 keys before RoPE are then identical (cosine 1), and after RoPE two of them p apart
    have cosine sum_i w_i cos(p theta_i), w_i the share of the key's energy in frequency i."""
    model, processor = tiny
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.zero_()
    image = Image.new("RGB", (112, 112), (90, 20, 200))
    layer0 = key_redundancy(model, processor, [image], CAPTION_INSTRUCTION, pairs=300)[0]
    for kind in ("right", "below", "random"):
        assert layer0[f"{kind}_unrotated"] == pytest.approx(1, abs=1e-5)

    pixels = processor.image_processor([image], return_tensors="pt").pixel_values
    attention = model.model.language_model.layers[0]
    with torch.no_grad():
        token = model.model.get_image_features(pixel_values=pixels).pooler_output[0][0]
        key = attention.self_attn.k_proj(attention.input_layernorm(token)).view(-1, attention.self_attn.head_dim)
    half = key.shape[-1] // 2
    energy = key[:, :half] ** 2 + key[:, half:] ** 2  # heads, frequencies
    theta = model.config.text_config.rope_parameters["rope_theta"] ** (-torch.arange(half) * 2 / key.shape[-1])

    def rope_cosine(distance: int) -> float:
        return ((energy * torch.cos(distance * theta)).sum(-1) / energy.sum(-1)).mean().item()

    assert layer0["right_cached"] == pytest.approx(rope_cosine(1), abs=1e-4)
    assert layer0["below_cached"] == pytest.approx(rope_cosine(14), abs=1e-4)
    assert not math.isclose(rope_cosine(1), rope_cosine(14), abs_tol=1e-2)


@pytest.mark.slow
def test_shipped_model_quality_on_a_few_unseen_scenes():
    model, processor = load_demo(demo_dir("demo"))
    scenes = DEMO_V1.scenes(6, seed=0, split="test")
    result = score(model, processor, scenes, [s.image for s in scenes], batch_size=6)
    assert set(result["vqa_by_kind"]) <= {"count", "shape", "color", "color_of", "where"}
    assert result["n_questions"] == sum(len(s.qa) for s in scenes)
    assert result["caption_exact_match"] >= 0.5 and result["vqa_by_kind"]["count"] == 1.0
    assert "description_rouge_l" not in result  # v1 scenes have no description
    blanks = [Image.new("RGB", s.image.size, (48, 48, 48)) for s in scenes]
    assert score(model, processor, scenes, blanks, batch_size=6)["caption_exact_match"] == 0
