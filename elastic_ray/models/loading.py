"""Load a supported VLM and its processor by name, local path or hub id."""

import functools
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

# The shipped demo models' weights; their build and training code (elastic_ray.demo) is never imported here.
DEMO_ROOT = Path(__file__).parents[1] / "demo"
DEMO_MODELS = {"demo": "v1", "demo-v2": "v2"}
# transformers' names for each model type: imported on first use (its processing and modeling code
# costs seconds to import, which a job's driver, needing only configs, never pays)
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


@functools.cache
def image_only_processor(model_type: str):
    """A Qwen-VL processor class without its video half, which needs torchvision."""
    processor_cls = getattr(transformers, QWEN_PROCESSORS[model_type])

    class ImageOnly(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_cls.__name__}"
    return ImageOnly


def demo_dir(name: str) -> Path:
    """The weight folder of a demo model by name ('demo', 'demo-v2'), whether or not it is trained yet."""
    return DEMO_ROOT / DEMO_MODELS[name]


def resolve(name_or_path: str) -> str:
    """A demo model's name ('demo', 'demo-v2') gives its folder in the package; anything else is a
    local path or a hub id."""
    if name_or_path in DEMO_MODELS:
        path = demo_dir(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the {name_or_path} model is missing from {path}; "
                                    f"train it with jobs/train_demo.py --config {name_or_path}")
        return str(path)
    return str(name_or_path)


def check_local_model(name_or_path: str, max_tokens: int) -> None:
    """The model is 'demo', a local directory or a hub id already in the local Hugging Face cache
    (looked up on disk, never on the network), and its context leaves room for a prompt after
    `max_tokens` new tokens; else ValueError with a one-line reason."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        path = resolve(name_or_path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    if not Path(path).is_dir():
        if path.startswith(("/", ".", "~")):
            raise ValueError(f"model path not found: {name_or_path}")
        try:
            cached = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a valid repo id either
            cached = None
        if not isinstance(cached, str):
            raise ValueError(f"model {name_or_path!r} is neither 'demo', a local directory nor in the local Hugging "
                             f"Face cache ({constants.HF_HUB_CACHE}); download it first (hf download {name_or_path})")
        path = str(Path(cached).parent)
    context = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config().max_position_embeddings
    if max_tokens >= context:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for a prompt in {name_or_path}'s "
                         f"{context}-token context")


def load_processor(path: str, model_type: str):
    """AutoProcessor; for Qwen-VL without torchvision (or a saved image-only one), the image half alone."""
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except (ImportError, AttributeError, TypeError, ValueError):
        if model_type not in QWEN_PROCESSORS:
            raise
        processor = None
    if getattr(processor, "image_processor", None) is None and model_type in QWEN_PROCESSORS:
        processor = image_only_processor(model_type).from_pretrained(path)
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path} has no image processor")
    return processor


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
):
    """Return `(model, processor)`; `trust_remote_code` stays off. dtype defaults to the checkpoint's."""
    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"unsupported model type {config.model_type!r}; supported: {sorted(MODEL_CLASSES)}")
    model = getattr(transformers, MODEL_CLASSES[config.model_type]).from_pretrained(
        path, dtype=dtype or "auto", attn_implementation=attn_implementation, trust_remote_code=False
    )
    if device is not None:
        model = model.to(device)
    return model.eval(), load_processor(path, config.model_type)
