"""`LLM`: the public entry point. Images and instructions in, captions and cache statistics out."""

import copy
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from elastic_ray.config import CacheConfig, SamplingParams
from elastic_ray.hf.generate import check_positions, generate_compressed
from elastic_ray.models.family import family_of
from elastic_ray.models.loading import load
from elastic_ray.models.prompts import build_prompt


@dataclass
class RequestOutput:
    """One request's result. `token_ids` are the generated ids (EOS included when it ended the text)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict = field(default_factory=dict)


class StopStrings(StoppingCriteria):
    """Ends a row once its decoded continuation contains one of the stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


class LLM:
    """A VLM with a compressed KV cache.

    `LLM("demo" | path | hub id | (model, processor), cache=CacheConfig(...))`, then
    `generate([{"image": PIL.Image, "prompt": str}, ...], SamplingParams(...))`.
    """

    def __init__(self, model, cache: CacheConfig | None = None, *, dtype=None, device=None,
                 attn_implementation: str = "sdpa", max_batch_size: int = 16):
        if isinstance(model, tuple):
            self.model, self.processor = model
        else:
            self.model, self.processor = load(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
        self.cache = cache or CacheConfig()
        self.family = family_of(self.model)
        check_positions(self.cache.policy, self.family)
        self.max_batch_size = max_batch_size
        self.tokenizer = self.processor.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def entry_bytes(self) -> int:
        """Bytes one cache entry takes across all layers (keys and values)."""
        element = next(self.model.parameters()).element_size()
        return 2 * len(self.family.attentions) * self.family.kv_heads * self.family.head_dim * element

    def encode(self, requests: list[dict]) -> dict:
        """Prompts through the processor: left-padded tensors on the model's device."""
        images, prompts = [], []
        for i, request in enumerate(requests):
            image, prompt = request.get("image"), request.get("prompt")
            if not isinstance(image, Image.Image):
                raise ValueError(f"request {i}: 'image' must be a PIL image, got {type(image).__name__}")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"request {i}: 'prompt' must be a non-empty string")
            images.append(image.convert("RGB"))
            prompts.append(build_prompt(self.processor, prompt))
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(self.model.device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}

    def generation_config(self, sampling: SamplingParams):
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = sampling.max_tokens
        config.do_sample = sampling.temperature > 0
        config.temperature = sampling.temperature if config.do_sample else None
        config.top_p = sampling.top_p if config.do_sample else None
        config.top_k = None
        config.eos_token_id = None if sampling.ignore_eos else self.eos_token_ids or None
        config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def generate(self, requests: list[dict], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        sampling = sampling or SamplingParams()
        outputs = []
        for start in range(0, len(requests), self.max_batch_size):
            outputs += self._generate_batch(requests[start : start + self.max_batch_size], sampling, start)
        return outputs

    def _generate_batch(self, requests: list[dict], sampling: SamplingParams, first_index: int) -> list[RequestOutput]:
        inputs = self.encode(requests)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        prompt_width = inputs["input_ids"].shape[1]
        stopping = StoppingCriteriaList([StopStrings(self.tokenizer, sampling.stop, prompt_width)] if sampling.stop else [])
        sequences, cache = generate_compressed(
            self.model, inputs, self.cache.policy, self.family,
            generation_config=self.generation_config(sampling), stopping_criteria=stopping,
        )
        prompt_lengths = inputs["attention_mask"].sum(1).tolist()
        return [
            self._output(first_index + row, sequences[row, prompt_width:].tolist(), int(prompt_lengths[row]), cache, row, sampling)
            for row in range(len(requests))
        ]

    def _has_stop(self, token_ids: list[int], stop: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return any(s in text for s in stop)

    def _output(self, index, generated, prompt_tokens, cache, row, sampling) -> RequestOutput:
        eos = set(self.eos_token_ids) if not sampling.ignore_eos else set()
        end = next((i + 1 for i, t in enumerate(generated) if t in eos), None)
        finish = "stop" if end is not None else "length"
        token_ids = generated[:end] if end is not None else generated
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if any(stop in text for stop in sampling.stop):
            # Keep the tokens up to the one that completed a stop string; the text ends before it.
            end = next(k for k in range(1, len(token_ids) + 1) if self._has_stop(token_ids[:k], sampling.stop))
            token_ids, finish = token_ids[:end], "stop"
            text = text[: min(text.index(s) for s in sampling.stop if s in text)]
        fed = len(token_ids) - 1  # the last generated token is never fed back
        kept = int(cache.history[min(fed, len(cache.history) - 1)][row])
        layers = len(self.family.attentions)
        stats = {
            "prompt_tokens": prompt_tokens,
            "output_tokens": len(token_ids),
            "kv_entries_prompt": [int(cache.history[0][row])] * layers,
            "kv_entries": [kept] * layers,
            "kv_bytes": kept * self.entry_bytes(),
            "kv_bytes_full": (prompt_tokens + fed) * self.entry_bytes(),
            "method": self.cache.method,
            "budget": self.cache.budget,
        }
        return RequestOutput(index, text.strip(), token_ids, finish, stats)
