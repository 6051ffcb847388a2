"""Runs the model: prefill a batch of prompts into their slots, or one decode step over all busy slots."""

import torch
from torch import Tensor, nn

from elastic_ray.engine.sequence import Sequence
from elastic_ray.engine.slots import KVSlots, SlotCache
from elastic_ray.hf.cache import CompressedCache, cache_keyword
from elastic_ray.hf.hooks import install_hooks
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import Family

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def collate(inputs: list[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Batch single-prompt processor outputs as the processor would: sequences left-padded,
    image tensors concatenated along their first dimension."""
    batch = {}
    for key in inputs[0]:
        tensors = [x[key] for x in inputs]
        if key in SEQUENCE_KEYS:
            width = max(t.shape[-1] for t in tensors)
            fill = pad_token_id if key == "input_ids" else 0
            tensors = [torch.nn.functional.pad(t, (width - t.shape[-1], 0), value=fill) for t in tensors]
        batch[key] = torch.cat(tensors, dim=0)
    return batch


class ModelRunner:
    """The model, its slots and each slot's next RoPE position ([slots, R]; R = 1, or 4 for M-RoPE)."""

    def __init__(self, model: nn.Module, family: Family, policy: CachePolicy, slots: KVSlots, pad_token_id: int):
        self.model, self.family, self.policy, self.slots = model, family, policy, slots
        self.pad_token_id = pad_token_id
        self.cache_keyword = cache_keyword(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        rows = 4 if family.model_type in ("qwen2_vl", "qwen2_5_vl") else 1
        self.next_position = torch.zeros(slots.num_slots, rows, dtype=torch.long, device=self.device)
        install_hooks(family)

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> Tensor:
        """Run the prompts through a scratch compressed cache and store each in its slot.
        Returns the last-position logits [k, vocab]."""
        inputs = {
            k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None)
            for k, v in collate([s.inputs for s in seqs], self.pad_token_id).items()
        }
        # positions exactly as generate() builds them (M-RoPE models compute their 3-D index here)
        positions = self.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
        if bool(inputs["attention_mask"].all()):
            del inputs["attention_mask"]  # as generate() does: no padding, no mask
        cache = CompressedCache(self.policy, len(self.family.attentions), image=self.family.image_mask(inputs["input_ids"]))
        out = self.model(**inputs, position_ids=positions, **{self.cache_keyword: cache}, use_cache=True,
                         logits_to_keep=1)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        for layer_idx, layer in enumerate(cache.layers):
            self.slots.store_prompt(slots, layer_idx, layer)
        self.slots.lengths[slots] = cache.lengths
        self.slots.seen[slots] = cache.seen
        self.slots.truncation[slots] = cache.truncation
        last = positions[..., -1]  # [B] or [R, B]
        self.next_position[slots] = (last[:, None] if last.dim() == 1 else last.T) + 1
        for seq, kept in zip(seqs, cache.lengths.tolist()):
            seq.kv_entries_prompt = kept
        return out.logits[:, -1]

    @torch.no_grad()
    def decode(self, seqs: list[Sequence]) -> Tensor:
        """Feed each running sequence its last token; seqs[i] owns slot i. Returns logits [n, vocab]."""
        n = len(seqs)
        cache = SlotCache(self.slots, n, self.policy)
        stored = cache.lengths.clone()
        mask = cache.begin_step()
        if self.policy.positions == "compact":
            positions = stored[:, None]
        else:
            positions = self.next_position[:n]
            positions = positions if positions.shape[1] == 1 else positions.T[:, :, None]
        tokens = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        out = self.model(
            input_ids=tokens, attention_mask=None if bool(mask.all()) else mask.long(), position_ids=positions,
            **{self.cache_keyword: cache}, use_cache=True, logits_to_keep=1,
        )
        self.next_position[:n] += 1
        return out.logits[:, -1]

    def move(self, source: int, target: int) -> None:
        self.slots.move(source, target)
        self.next_position[target] = self.next_position[source]
