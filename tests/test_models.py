"""Loading VLMs and their processors from local directories, offline, and building prompts."""

import json
import random
import socket
import unicodedata

import pytest
import torch
from huggingface_hub import constants

from elastic_ray.models import loading
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import (build_prompt, check_instruction_length, longest_token_chars,
                                        max_instruction_chars, prepare_request)
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


def long_texts(tokenizer, length: int) -> dict[str, str]:
    """Texts of `length` characters built to need as few tokens as possible: the longest tokens
    repeated, sequences that Unicode normalisation joins into one character, and random text."""
    longest = max(tokenizer.get_vocab(), key=len)
    rng = random.Random(0)
    texts = {"longest token": longest, "spaces": " ", "combining": "e\u0301", "hangul jamo": "\u1100\u1161\u11a8",
             "four into one": unicodedata.normalize("NFD", "\u1f82"),
             "random": "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(64))}
    return {name: (unit * (length // len(unit) + 1))[:length] for name, unit in texts.items()}


@pytest.fixture(scope="module")
def demo_processor():
    return loading.load("demo")[1]


def test_an_instruction_refused_for_its_length_could_never_fit(demo_processor, images):
    processor, limit = demo_processor, 40  # byte-level BPE, as the LLaVA and Qwen-VL families' vocabularies
    bound = max_instruction_chars(processor, limit)
    assert bound == limit * longest_token_chars(processor.tokenizer) * 4 == limit * 10 * 4
    for name, text in long_texts(processor.tokenizer, bound + 1).items():
        with pytest.raises(ValueError, match=f"has {bound + 1} characters, more than a prompt of at most {limit}"):
            check_instruction_length(processor, text, limit)
        # sound: tokenised anyway, it is over the limit
        assert len(processor.tokenizer(text)["input_ids"]) > limit, name
    prepared = prepare_request(processor, {"image": images[0], "prompt": "x" * bound}, 10**6)
    assert prepared.prompt_tokens > limit


def test_a_vocabulary_whose_unknown_token_covers_any_text_gets_a_fixed_bound(tiny_llava):
    tokenizer = tiny_llava[1].tokenizer  # word-level: an unknown word of any length is one token
    assert len(tokenizer("x" * 5000)["input_ids"]) == 1 and longest_token_chars(tokenizer) is None
    assert max_instruction_chars(tiny_llava[1], 40) == 40 * 64


def test_a_10_mb_instruction_is_refused_before_the_processor_runs(tiny_llava, images):
    calls = []

    class Counting:  # the real processor, counting its calls
        tokenizer = tiny_llava[1].tokenizer

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return tiny_llava[1](*args, **kwargs)

    with pytest.raises(ValueError, match="has 10000000 characters"):
        prepare_request(Counting(), {"image": images[0], "prompt": "x" * 10_000_000}, 600)
    assert calls == []
    prepare_request(Counting(), {"image": images[0], "prompt": "x" * 100}, 600)
    assert calls == [1]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_a_model_must_be_demo_a_directory_or_in_the_local_cache(saved_model, tmp_path, monkeypatch, no_network):
    _, path, _ = saved_model
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    loading.check_local_model("demo", 32)
    loading.check_local_model(str(path), 32)
    for name in ("org/not-downloaded", "not-a//repo id", "gpt2"):
        with pytest.raises(ValueError, match=f"model {name!r} is neither 'demo', a local directory nor in the local "
                                             f"Hugging Face cache \\({tmp_path}\\)"):
            loading.check_local_model(name, 32)
    with pytest.raises(ValueError, match="model path not found: /no/such/model"):
        loading.check_local_model("/no/such/model", 32)
    snapshot = tmp_path / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    loading.check_local_model("org/cached", 32)
    with pytest.raises(ValueError, match="max_tokens 100000 leaves no room for a prompt in org/cached's"):
        loading.check_local_model("org/cached", 100_000)
