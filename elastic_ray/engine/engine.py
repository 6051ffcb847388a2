"""Continuous batching over fixed-size compressed KV slots: `add_request`, `step`, `generate`."""

import itertools
import os
from dataclasses import dataclass

import torch
from torch import nn

from elastic_ray.config import EngineConfig, SamplingParams
from elastic_ray.engine.detokenizer import IncrementalText
from elastic_ray.engine.readback import Copy
from elastic_ray.engine.runner import ModelRunner
from elastic_ray.engine.sampler import Sampler
from elastic_ray.engine.scheduler import Scheduler
from elastic_ray.engine.sequence import Sequence
from elastic_ray.engine.slots import KVSlots
from elastic_ray.hf.generate import check_positions
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import PreparedRequest, prepare_request, prompt_limit
from elastic_ray.outputs import RequestOutput, eos_token_ids, finish


def default_compile(device: torch.device) -> bool:
    """Whether a decode step is compiled when `EngineConfig.compile` is None: on CUDA (CUDA graphs
    remove the per-kernel launch cost), not on the CPU (see the README's Performance section)."""
    return device.type == "cuda"


def default_async_output(device: torch.device) -> bool:
    """Whether outputs lag a step when `EngineConfig.async_output` is None: on CUDA, where kernels run
    while the host goes on, so the host's work on step N's tokens overlaps step N+1; not on the CPU,
    whose kernels run on the host thread itself, leaving nothing to overlap (see the README's Performance section)."""
    return device.type == "cuda"


def free_memory(device: torch.device) -> int:
    """Bytes free on the device now: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Group:
    """Sequences sampled together: row i of `copy` is `seqs[i]`'s token, whatever slot moves
    happen before it is read; `kv_entries[i]`: what its slot held in each layer after the step."""

    seqs: list[Sequence]
    copy: Copy
    kv_entries: list[list[int]]


@dataclass
class Launch:
    """A step launched on the device whose outputs are still to be made: its sampled groups, and
    the sequences whose prefill failed (with their error outputs)."""

    groups: list[Group]
    failed: list[tuple[Sequence, RequestOutput]]


class Engine:
    """One model, one cache method, `num_slots` sequences in flight.

    Each `step()` either prefills newly admitted requests (prefill first, as nano-vllm does) or
    decodes one token for every running sequence, then reads sampled tokens back, makes the
    outputs and retires the finished sequences so their slots are refilled at the next step.

    With async output the read is of the step before, one step behind the device: a sequence that
    ended there (EOS, a stop string) was still fed to the step just launched, whose extra token is
    discarded; one whose last token was drawn (max_tokens) leaves its slot before the next launch,
    as the host knows it in advance. Each sequence's row in a step is the one it had at launch; slot
    moves come later in stream order.
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
        self.entry_bytes = self.family.entry_bytes(param.element_size())  # one entry in every layer
        self.layer_policies = policy.layer_policies(len(self.family.attentions))
        self.layer_entry_bytes = self.entry_bytes // len(self.layer_policies)
        self.slot_sizes = self.slot_sizes_for(policy)
        memory = config.kv_cache_memory
        self.kv_budget_bytes = int(memory * free_memory(param.device)) if isinstance(memory, float) else memory
        num_slots = self.slots_for(policy)
        if num_slots < 1:
            raise ValueError(
                f"kv_cache_memory of {self.kv_budget_bytes} bytes holds no slot of "
                f"{self.slot_bytes} bytes ({self.slot_sizes} entries per layer for "
                f"{self.max_prompt_tokens} prompt + {config.max_tokens} new tokens)"
            )
        slots = KVSlots(num_slots, self.slot_sizes, self.family.kv_heads,
                        self.family.head_dim, param.dtype, param.device, with_scores=policy.decode_scores)
        sampler = Sampler(num_slots, config.max_tokens, param.device)
        self.compiled = default_compile(param.device) if config.compile is None else config.compile
        self.async_output = default_async_output(param.device) if config.async_output is None else config.async_output
        self._in_flight: Launch | None = None  # with async output: the step launched, not yet read
        self.runner = ModelRunner(model, self.family, policy, slots, sampler, self.tokenizer.pad_token_id,
                                  self.compiled)
        self.scheduler = Scheduler(num_slots, config.max_prefill_tokens)
        self._ids = itertools.count()
        self.peak_kv_bytes = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.busy_slot_steps = 0  # running sequences summed over decode steps
        self.aborted = 0

    @property
    def num_slots(self) -> int:
        return self.scheduler.num_slots

    def slot_sizes_for(self, policy: CachePolicy) -> list[int]:
        """Entries a slot holds in each layer under `policy`: each layer's peak (spec §10)."""
        return [p.peak_entries(self.max_prompt_tokens, self.config.max_tokens)
                for p in policy.layer_policies(len(self.family.attentions))]

    def slots_for(self, policy: CachePolicy) -> int:
        """The slots this engine's KV budget holds under `policy`, for the same prompt and output limits
        (with the full cache's policy: what compression gained)."""
        slot_bytes = sum(self.slot_sizes_for(policy)) * self.layer_entry_bytes
        return min(self.config.max_num_seqs, self.kv_budget_bytes // slot_bytes)

    @property
    def slot_bytes(self) -> int:
        """Key/value bytes of one slot, every layer at its own size."""
        return sum(self.slot_sizes) * self.layer_entry_bytes

    def kv_bytes(self, entries: int) -> int:
        """Bytes of `entries` key/value entries summed over layers (one layer's entry each)."""
        return entries * self.layer_entry_bytes

    @property
    def mean_busy_slots(self) -> float:
        """Occupancy: running sequences per decode step, on average (0 before any decode step)."""
        return self.busy_slot_steps / self.steps["decode"] if self.steps["decode"] else 0.0

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
        raises ValueError for a request it cannot run, and whatever else the processor raises on it
        (the request is queued as the last act, so one that raised left no trace).

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
        generator = None if sampling.seed is None else torch.Generator(self.runner.device).manual_seed(sampling.seed)
        seq = Sequence(request_id, prepared.inputs, prepared.prompt_tokens, sampling, generator=generator,
                       forced=None if forced_tokens is None else list(forced_tokens))
        seq.text = IncrementalText(self.tokenizer)
        seq.eos = set() if sampling.ignore_eos else eos_token_ids(self.model, self.tokenizer)
        self.scheduler.add(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def abort(self, request_id) -> bool:
        """Drop an unfinished request between steps: a waiting one leaves the queue, a running one
        frees its slot for the next step, and no output of it comes any more. Returns whether the
        request was there."""
        seq = self.scheduler.abort(request_id) or self._owed(request_id)
        if seq is None:
            return False
        seq.ended = True
        if seq.slot >= 0:  # running: free its slot now
            self._retire([seq])
        self.aborted += 1
        return True

    def _owed(self, request_id) -> Sequence | None:
        """The sequence of `request_id` if the step in flight owes its output but it holds no slot any
        more: a failed prefill, whose error output comes one step later with async output."""
        failed = self._in_flight.failed if self._in_flight else []
        return next((seq for seq, _ in failed if seq.request_id == request_id and not seq.ended), None)

    def step(self) -> list[RequestOutput]:
        """Launch one step (a prefill of newly admitted requests, else a decode of the running ones),
        then turn a launched step's tokens into outputs: this step's, or with `async_output` the step
        before's, so that the host works on step N while the device computes step N+1."""
        # a sequence whose last token is drawn ends, known on the host before that token is read
        self._retire([seq for seq in self.scheduler.running if seq.drawn == seq.sampling.max_tokens])
        launched = self._launch()
        if self.async_output:
            launched, self._in_flight = self._in_flight, launched
        return self._collect(launched) if launched else []

    def _launch(self) -> Launch | None:
        self.runner.readback.flip()  # the step before's copy may not have been read yet
        admitted = self.scheduler.admit()
        if admitted:
            return self._prefill(admitted)
        if self.scheduler.running:
            return self._decode(list(self.scheduler.running))
        return None

    def _prefill(self, admitted: list[Sequence]) -> Launch:
        """Prefill the admitted sequences together; if that fails, each alone, so a request that
        cannot be prefilled (or compressed) fails by itself with finish_reason "error"."""
        self.steps["prefill"] += 1
        try:
            groups, failed = [(admitted, self.runner.prefill(admitted))], []
        except Exception:
            groups, failed = [], []
            for seq in admitted:
                try:
                    groups.append(([seq], self.runner.prefill([seq])))
                except Exception as error:
                    failed.append((seq, _failure(seq, error)))
        self._retire([seq for seq, _ in failed])
        stored = sum(sum(s.kv_entries) for s in self.scheduler.running)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes(stored))
        return Launch([self._sample(seqs, logits) for seqs, logits in groups], failed)

    def _decode(self, seqs: list[Sequence]) -> Launch:
        """One token for every running sequence (seqs[i] owns slot i)."""
        layers = len(self.layer_policies)
        stored = sum(sum(s.kv_entries) + layers for s in seqs)  # the new entries, before any eviction
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes(stored))
        logits = self.runner.decode(len(seqs), max(s.columns_next_step() for s in seqs))
        for seq in seqs:
            seq.token_fed(self.layer_policies)
        self.steps["decode"] += 1
        self.busy_slot_steps += len(seqs)
        return Launch([self._sample(seqs, logits)], [])

    def _sample(self, seqs: list[Sequence], logits) -> Group:
        copy = self.runner.sample(logits, seqs[0].slot, seqs)
        for seq in seqs:
            seq.drawn += 1
        return Group(seqs, copy, [list(s.kv_entries) for s in seqs])

    def _collect(self, launch: Launch) -> list[RequestOutput]:
        """A launched step's outputs: its tokens read back and appended; the finished sequences end
        and leave their slots. A row whose sequence had already ended was computed for nothing."""
        outputs = [(seq, output) for seq, output in launch.failed if not seq.ended]
        for group in launch.groups:
            tokens, logprobs = group.copy.read()
            for row, seq in enumerate(group.seqs):
                if seq.ended:
                    continue
                try:
                    output = self._advance(seq, tokens[row], None if logprobs is None else logprobs[row],
                                           group.kv_entries[row])
                except Exception as error:  # e.g. the tokenizer failing on this sequence's text
                    output = _failure(seq, error)
                outputs.append((seq, output))
        finished = [seq for seq, output in outputs if output.finished]
        for seq in finished:
            seq.ended = True
        self._retire([seq for seq in finished if seq.slot >= 0])
        return [output for _, output in outputs]

    def _advance(self, seq: Sequence, token: int, logprob: float | None, kv_entries: list[int]) -> RequestOutput:
        """Append a sampled token; the request's output, finished if EOS, a stop string or its length
        says so. `kv_entries`: what its slot held in each layer once the token's step had run."""
        seq.generated.append(token)
        if seq.forced is not None:
            seq.logprobs.append(logprob)
        text = seq.text.add(token)
        sampling = seq.sampling
        if token in seq.eos or seq.text.completed(sampling.stop) or len(seq.generated) >= sampling.max_tokens:
            token_ids, final, reason = finish(self.tokenizer, seq.generated, sampling, seq.eos)  # exact, once
            if reason is not None:
                return RequestOutput(seq.request_id, final, token_ids, reason, self._stats(seq, token_ids, kv_entries))
        return RequestOutput(seq.request_id, text.strip(), list(seq.generated), None)

    def _stats(self, seq: Sequence, token_ids: list[int], kv_entries: list[int]) -> dict:
        fed = len(token_ids) - 1  # the last generated token is never fed back
        stats = {
            "prompt_tokens": seq.prompt_tokens,
            "output_tokens": len(token_ids),
            "kv_entries_prompt": list(seq.kv_entries_prompt),
            "kv_entries": kv_entries,
            "kv_bytes": self.kv_bytes(sum(kv_entries)),
            "kv_bytes_full": (seq.prompt_tokens + fed) * self.entry_bytes,
            "slot_bytes": self.slot_bytes,
            "method": self.policy.name,
            "budget": self.policy.budget,
        }
        if seq.forced is not None:
            stats["logprobs"] = list(seq.logprobs)
        return stats

    def _retire(self, finished: list[Sequence]) -> None:
        for source, target in self.scheduler.retire(finished):
            self.runner.move(source, target)
        self.runner.set_busy(len(self.scheduler.running))

    def generate(self, requests: list[dict], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """Run requests to completion; outputs in request order, `request_id` = index. A request the
        engine cannot run gets finish_reason "error" and its reason; the others run."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drive a busy one with step()")
        ids, refused = [], {}
        for index, request in enumerate(requests):
            try:
                ids.append(self.add_request(request, sampling))
            except Exception as error:  # a request that cannot start fails alone
                ids.append(None)
                reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
                refused[index] = RequestOutput(index, None, [], "error", error=f"request {index}: {reason}")
        done = {}
        while self.has_unfinished():
            done.update((o.request_id, o) for o in self.step() if o.finished)
        outputs = []
        for index, request_id in enumerate(ids):
            output = refused.get(index) or done[request_id]
            output.request_id = index
            outputs.append(output)
        return outputs


def _failure(seq: Sequence, error: Exception) -> RequestOutput:
    return RequestOutput(seq.request_id, None, list(seq.generated), "error", error=f"{type(error).__name__}: {error}")
