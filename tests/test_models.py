"""Loading VLMs and their processors from local directories, offline, and building prompts."""

import json

import pytest
import torch

from elastic_ray.models import loading
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import build_prompt
from elastic_ray.models.synthetic import random_llava, random_qwen2_vl


BUILDERS = {"llava": random_llava, "qwen2_vl": random_qwen2_vl, "qwen2_5_vl": lambda: random_qwen2_vl(version="2.5")}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved_model(request, tmp_path_factory):
    model, processor = BUILDERS[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return request.param, path, model


def test_load_returns_the_same_weights_and_a_working_processor(saved_model, images, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_type, path, original = saved_model
    model, processor = loading.load(str(path), dtype=torch.float32)
    assert model.config.model_type == model_type
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    inputs = processor(images=[images[0]], text=[build_prompt(processor, "what")], return_tensors="pt")
    image_token = model.config.image_token_id if model_type != "llava" else model.config.image_token_index
    assert int((inputs["input_ids"] == image_token).sum()) > 1  # the placeholder was expanded


def test_load_honours_dtype_and_attention_implementation(saved_model):
    _, path, _ = saved_model
    model, _ = loading.load(str(path), dtype=torch.bfloat16, attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.get_text_config()._attn_implementation == "eager"


def test_unsupported_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model type 'gpt2'; supported: \['llava', 'qwen2_5_vl', 'qwen2_vl'\]"):
        loading.load(str(tmp_path))


def test_prompts_use_the_chat_template_or_the_llava_conversation_format(tiny_llava, tiny_qwen):
    assert build_prompt(tiny_llava[1], "Describe the image.") == "USER: <image>\nDescribe the image. ASSISTANT:"
    qwen = build_prompt(tiny_qwen[1], "Describe the image.")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in qwen and qwen.endswith("assistant :")


def test_family_finds_every_attention_layer(tiny_llava, tiny_qwen):
    for model, _ in (tiny_llava, tiny_qwen):
        family = family_of(model)
        assert len(family.attentions) == model.config.get_text_config().num_hidden_layers
        assert [a.layer_idx for a in family.attentions] == list(range(len(family.attentions)))
    assert family_of(tiny_qwen[0]).kv_heads == 2
