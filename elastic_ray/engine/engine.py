"""Continuous batching over fixed-size compressed KV slots: `add_request`, `step`, `generate`."""

import itertools
import os

import torch
from torch import nn

from elastic_ray.config import EngineConfig, SamplingParams
from elastic_ray.engine.runner import ModelRunner
from elastic_ray.engine.sampler import sample
from elastic_ray.engine.scheduler import Scheduler
from elastic_ray.engine.sequence import Sequence
from elastic_ray.engine.slots import KVSlots
from elastic_ray.hf.generate import check_positions
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import PreparedRequest, prepare_request, prompt_limit
from elastic_ray.outputs import RequestOutput, eos_token_ids, finish


def free_memory(device: torch.device) -> int:
    """Bytes free on the device now: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Engine:
    """One model, one cache method, `num_slots` sequences in flight.

    Each `step()` either prefills newly admitted requests (prefill first, as nano-vllm does) or
    decodes one token for every running sequence, then retires the finished ones so their
    slots are refilled at the next step.
    """

    def __init__(self, model: nn.Module, processor, policy: CachePolicy, config: EngineConfig | None = None):
        self.model, self.processor, self.policy = model, processor, policy
        self.config = config = config or EngineConfig()
        self.tokenizer = processor.tokenizer
        self.family = family_of(model)
        check_positions(policy, self.family)
        context = model.config.get_text_config().max_position_embeddings
        self.max_prompt_tokens = prompt_limit(model.config, config.max_tokens, config.max_prompt_tokens)
        if self.max_prompt_tokens < 1 or self.max_prompt_tokens + config.max_tokens > context:
            raise ValueError(
                f"max_prompt_tokens + max_tokens = {self.max_prompt_tokens + config.max_tokens} exceeds the "
                f"model's context of {context} tokens"
            )
        param = next(model.parameters())
        self.entry_bytes = self.family.entry_bytes(param.element_size())
        self.slot_size = policy.peak_entries(self.max_prompt_tokens, config.max_tokens)
        memory = config.kv_cache_memory
        self.kv_budget_bytes = int(memory * free_memory(param.device)) if isinstance(memory, float) else memory
        num_slots = self.slots_for(policy)
        if num_slots < 1:
            raise ValueError(
                f"kv_cache_memory of {self.kv_budget_bytes} bytes holds no slot of "
                f"{self.slot_size * self.entry_bytes} bytes ({self.slot_size} entries for "
                f"{self.max_prompt_tokens} prompt + {config.max_tokens} new tokens)"
            )
        slots = KVSlots(len(self.family.attentions), num_slots, self.slot_size, self.family.kv_heads,
                        self.family.head_dim, param.dtype, param.device, with_scores=policy.decode_scores)
        self.runner = ModelRunner(model, self.family, policy, slots, self.tokenizer.pad_token_id)
        self.scheduler = Scheduler(num_slots, config.max_prefill_tokens)
        self._ids = itertools.count()
        self.peak_kv_bytes = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.aborted = 0

    @property
    def num_slots(self) -> int:
        return self.scheduler.num_slots

    def slots_for(self, policy: CachePolicy) -> int:
        """The slots this engine's KV budget holds under `policy`, for the same prompt and output limits
        (with the full cache's policy: what compression gained)."""
        slot_bytes = policy.peak_entries(self.max_prompt_tokens, self.config.max_tokens) * self.entry_bytes
        return min(self.config.max_num_seqs, self.kv_budget_bytes // slot_bytes)

    @property
    def kv_allocated_bytes(self) -> int:
        return self.runner.slots.kv_bytes

    def prepare(self, request: dict | PreparedRequest) -> PreparedRequest:
        """The processor's work for a request, checked against this engine's prompt limit; safe
        to call from any thread (it touches no engine state). Raises ValueError."""
        return prepare_request(self.processor, request, self.max_prompt_tokens)

    def add_request(self, request: dict | PreparedRequest, sampling: SamplingParams | None = None, request_id=None,
                    forced_tokens: list[int] | None = None) -> int | str:
        """Queue `{"image": PIL.Image, "prompt": str}` or a `PreparedRequest` (see `prepare`);
        raises ValueError for a request it cannot run.

        With `forced_tokens` the request is teacher-forced: those tokens are fed instead of
        sampled ones, whatever EOS says, and `stats["logprobs"]` holds each one's log-probability.
        """
        sampling = sampling or SamplingParams()
        if forced_tokens is not None:
            if not forced_tokens:
                raise ValueError("forced_tokens must not be empty")
            sampling = SamplingParams(max_tokens=len(forced_tokens), ignore_eos=True)
        request_id = next(self._ids) if request_id is None else request_id
        if sampling.max_tokens > self.config.max_tokens:
            raise ValueError(f"max_tokens {sampling.max_tokens} exceeds the engine's limit of {self.config.max_tokens}")
        prepared = self.prepare(request)
        seq = Sequence(request_id, prepared.inputs, prepared.prompt_tokens, sampling,
                       forced=None if forced_tokens is None else list(forced_tokens))
        if sampling.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(sampling.seed)
        self.scheduler.add(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id) -> bool:
        """Drop an unfinished request between steps: a waiting one leaves the queue, a running one
        frees its slot for the next step. Returns whether the request was there."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        if seq.slot >= 0:  # running: free its slot now
            for source, target in self.scheduler.retire([seq]):
                self.runner.move(source, target)
        self.aborted += 1
        return True

    def step(self) -> list[RequestOutput]:
        """Advance every running request by one token; returns their outputs (finished ones included)."""
        admitted = self.scheduler.admit()
        if admitted:
            seqs, logits = admitted, self.runner.prefill(admitted)
            self.steps["prefill"] += 1
            stored = sum(s.kv_entries_prompt for s in self.scheduler.running)
        else:
            seqs = list(self.scheduler.running)
            if not seqs:
                return []
            stored = int(self.runner.slots.lengths[: len(seqs)].sum()) + len(seqs)  # before eviction
            logits = self.runner.decode(seqs)
            self.steps["decode"] += 1
        self.peak_kv_bytes = max(self.peak_kv_bytes, stored * self.entry_bytes)
        outputs, finished = [], []
        for seq, token in zip(seqs, sample(logits, seqs)):
            seq.generated.append(token)
            output = self._output(seq)
            outputs.append(output)
            if output.finished:
                finished.append(seq)
        for source, target in self.scheduler.retire(finished):
            self.runner.move(source, target)
        return outputs

    def _output(self, seq: Sequence) -> RequestOutput:
        eos = set() if seq.sampling.ignore_eos else eos_token_ids(self.model, self.tokenizer)
        token_ids, text, reason = finish(self.tokenizer, seq.generated, seq.sampling, eos)
        stats = {}
        if reason is not None:
            kept = int(self.runner.slots.lengths[seq.slot])
            fed = len(token_ids) - 1  # the last generated token is never fed back
            layers = len(self.family.attentions)
            stats = {
                "prompt_tokens": seq.prompt_tokens,
                "output_tokens": len(token_ids),
                "kv_entries_prompt": [seq.kv_entries_prompt] * layers,
                "kv_entries": [kept] * layers,
                "kv_bytes": kept * self.entry_bytes,
                "kv_bytes_full": (seq.prompt_tokens + fed) * self.entry_bytes,
                "slot_bytes": self.slot_size * self.entry_bytes,
                "method": self.policy.name,
                "budget": self.policy.budget,
            }
            if seq.forced is not None:
                stats["logprobs"] = list(seq.logprobs)
        return RequestOutput(seq.request_id, text, token_ids, reason, stats)

    def generate(self, requests: list[dict], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """Run requests to completion; outputs in request order, `request_id` = index. A request the
        engine cannot run gets finish_reason "error" and its reason; the others run."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drive a busy one with step()")
        ids, refused = [], {}
        for index, request in enumerate(requests):
            try:
                ids.append(self.add_request(request, sampling))
            except ValueError as error:
                ids.append(None)
                refused[index] = RequestOutput(index, None, [], "error", error=f"request {index}: {error}")
        done = {}
        while self.has_unfinished():
            done.update((o.request_id, o) for o in self.step() if o.finished)
        outputs = []
        for index, request_id in enumerate(ids):
            output = refused.get(index) or done[request_id]
            output.request_id = index
            outputs.append(output)
        return outputs
