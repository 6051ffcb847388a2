"""The bundled demo VLM loads offline and captions test scenes from the image; the runtime never
imports the demo's build and training code."""

import os
import subprocess
import sys

import huggingface_hub
import pytest
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from elastic_ray.data.shapes import BACKGROUND, CAPTION_INSTRUCTION, caption_exact_match, make_scenes, object_f1
from elastic_ray.demo.build import DEMO_V1
from elastic_ray.demo.quality import CAPTION_TOKENS, generate_answers
from elastic_ray.models.loading import demo_dir

DEMO_DIR = demo_dir("demo")
format_prompt = DEMO_V1.format_prompt

N = 8


@pytest.fixture(scope="module")
def demo():
    """Model and processor loaded with the hub switched off (any HTTP request would raise)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_OFFLINE", "1")
        model = LlavaForConditionalGeneration.from_pretrained(DEMO_DIR).eval()
        processor = AutoProcessor.from_pretrained(DEMO_DIR)
    return model, processor


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(N, seed=0, split="test")


def test_files_and_size():
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json"} <= names
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 25 * 2**20


def test_processor_expands_image_token(demo, scenes):
    model, processor = demo
    inputs = processor(images=[scenes[0].image], text=[format_prompt(CAPTION_INSTRUCTION)], return_tensors="pt")
    n_image = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image == model.config.image_seq_length >= 196
    assert inputs["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_INSTRUCTION}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == format_prompt(CAPTION_INSTRUCTION)


def test_captions_test_scenes(demo, scenes):
    model, processor = demo
    captions = generate_answers(model, processor, [s.image for s in scenes], [CAPTION_INSTRUCTION] * N,
                                CAPTION_TOKENS, batch_size=N)
    exact = sum(caption_exact_match(c, s.caption) for c, s in zip(captions, scenes))
    assert exact >= 6, list(zip(captions, [s.caption for s in scenes]))


def test_blank_images_collapse(demo, scenes):
    model, processor = demo
    blanks = [Image.new("RGB", s.image.size, (BACKGROUND,) * 3) for s in scenes]
    captions = generate_answers(model, processor, blanks, [CAPTION_INSTRUCTION] * N, CAPTION_TOKENS, batch_size=N)
    assert sum(caption_exact_match(c, s.caption) for c, s in zip(captions, scenes)) <= 1
    assert sum(object_f1(c, s.caption) for c, s in zip(captions, scenes)) / N < 0.4


def test_llm_demo_loads_by_name_and_captions_on_the_engine(scenes):
    from elastic_ray import LLM, SamplingParams
    from elastic_ray.models.loading import load

    model, _ = load("demo")
    assert model.config.model_type == "llava" and sum(p.numel() for p in model.parameters()) < 5e6
    llm = LLM("demo")
    outs = llm.generate([{"image": s.image, "prompt": CAPTION_INSTRUCTION} for s in scenes],
                        SamplingParams(max_tokens=CAPTION_TOKENS))
    assert all(o.finish_reason == "stop" for o in outs)  # ends on its own EOS
    assert sum(caption_exact_match(o.text, s.caption) for o, s in zip(outs, scenes)) >= 6


def test_the_runtime_never_imports_the_demo_training_code():
    """Importing the package, the engine, the pipeline and the server, and serving the demo model
    with LLM, loads nothing from elastic_ray.demo (the weights are read as files)."""
    script = (
        "import sys\n"
        "import elastic_ray, elastic_ray.llm, elastic_ray.engine.engine, elastic_ray.pipeline, elastic_ray.serving\n"
        "import elastic_ray.models.loading, elastic_ray.eval.sweep\n"
        "from elastic_ray import LLM\n"
        "LLM('demo')\n"
        "print(sorted(m for m in sys.modules if m.startswith('elastic_ray.demo')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_untrained_demo_model_is_named_with_the_command_that_trains_it(monkeypatch, tmp_path):
    from elastic_ray.models import loading

    monkeypatch.setattr(loading, "DEMO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="--config demo-v2"):
        loading.resolve("demo-v2")
