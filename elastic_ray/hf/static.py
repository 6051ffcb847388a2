"""The reference path: transformers' `generate()` on a compressed cache, in static padded batches.

The engine must produce what this produces (greedy), request by request; the benchmark's
"what a user would write" arm is this shape too.
"""

import copy

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from elastic_ray.config import SamplingParams
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import encode_requests
from elastic_ray.outputs import RequestOutput, eos_token_ids, finish


class StopStrings(StoppingCriteria):
    """Ends a row once its decoded continuation contains one of the stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


class StaticBatchGenerator:
    """`generate(requests, sampling)` in batches of `max_batch_size`, each padded to its longest prompt."""

    def __init__(self, model, processor, policy: CachePolicy, max_batch_size: int = 16):
        self.model, self.processor, self.policy = model, processor, policy
        self.tokenizer = processor.tokenizer
        self.family = family_of(model)
        self.max_batch_size = max_batch_size
        self.entry_bytes = self.family.entry_bytes(next(model.parameters()).element_size())

    def generation_config(self, sampling: SamplingParams):
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = sampling.max_tokens
        config.do_sample = sampling.temperature > 0
        config.temperature = sampling.temperature if config.do_sample else None
        config.top_p = sampling.top_p if config.do_sample else None
        config.top_k = None
        config.eos_token_id = None if sampling.ignore_eos else sorted(eos_token_ids(self.model, self.tokenizer)) or None
        config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def generate(self, requests: list[dict], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        sampling = sampling or SamplingParams()
        encode_requests(self.processor, requests)  # every request is checked before any work
        outputs = []
        for start in range(0, len(requests), self.max_batch_size):
            outputs += self._generate_batch(requests[start : start + self.max_batch_size], sampling, start)
        return outputs

    def _generate_batch(self, requests: list[dict], sampling: SamplingParams, first_index: int) -> list[RequestOutput]:
        param = next(self.model.parameters())
        inputs = {
            k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
            for k, v in encode_requests(self.processor, requests).items()
        }
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        prompt_width = inputs["input_ids"].shape[1]
        stopping = StoppingCriteriaList([StopStrings(self.tokenizer, sampling.stop, prompt_width)] if sampling.stop else [])
        sequences, cache = generate_compressed(
            self.model, inputs, self.policy, self.family,
            generation_config=self.generation_config(sampling), stopping_criteria=stopping,
        )
        prompt_lengths = inputs["attention_mask"].sum(1).tolist()
        eos = set() if sampling.ignore_eos else eos_token_ids(self.model, self.tokenizer)
        outputs = []
        for row in range(len(requests)):
            generated = sequences[row, prompt_width:].tolist()
            token_ids, text, reason = finish(self.tokenizer, generated, sampling, eos)
            fed = len(token_ids) - 1  # the last generated token is never fed back
            kept = cache.history[min(fed, len(cache.history) - 1)][:, row].tolist()  # per layer
            stats = {
                "prompt_tokens": int(prompt_lengths[row]),
                "output_tokens": len(token_ids),
                "kv_entries_prompt": cache.history[0][:, row].tolist(),
                "kv_entries": kept,
                "kv_bytes": sum(kept) * self.entry_bytes // len(kept),
                "kv_bytes_full": (int(prompt_lengths[row]) + fed) * self.entry_bytes,
                "method": self.policy.name,
                "budget": self.policy.budget,
            }
            outputs.append(RequestOutput(first_index + row, text, token_ids, reason or "length", stats))
        return outputs
