"""Where each supported model family keeps its decoder stack and attention layers."""

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SUPPORTED = ("llava", "qwen2_vl", "qwen2_5_vl")
MROPE = ("qwen2_vl", "qwen2_5_vl")  # 3-D rotary positions (temporal, height, width)


@dataclass
class Family:
    """The parts of a VLM a compressed cache needs to reach."""

    model_type: str
    decoder: nn.Module  # the text decoder stack: its forward builds the mask and the positions
    attentions: list[nn.Module]  # one self-attention module per decoder layer
    kv_heads: int
    head_dim: int
    image_token_id: int

    def image_mask(self, input_ids: Tensor) -> Tensor:
        """[B, S] bool: the prompt's image tokens."""
        return input_ids == self.image_token_id

    def entry_bytes(self, element_size: int) -> int:
        """Bytes one cache entry takes across all layers (keys and values)."""
        return 2 * len(self.attentions) * self.kv_heads * self.head_dim * element_size

    @property
    def positions_modes(self) -> tuple[str, ...]:
        return ("original",) if self.model_type in MROPE else ("original", "compact")


def family_of(model: nn.Module) -> Family:
    """Describe a loaded model; unsupported model types raise ValueError naming the supported ones."""
    model_type = model.config.model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {list(SUPPORTED)}")
    decoder = model.model.language_model
    text = model.config.get_text_config()
    attentions = [layer.self_attn for layer in decoder.layers]
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:  # older LLaVA configs name it image_token_index
        image_token_id = model.config.image_token_index
    return Family(model_type, decoder, attentions, text.num_key_value_heads, head_dim, image_token_id)


def attention_queries(attention: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """Recompute an attention module's rotated queries [B, Hq, Q, D] from its own inputs."""
    batch, length, _ = hidden_states.shape
    queries = attention.q_proj(hidden_states).view(batch, length, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    queries = queries.transpose(1, 2)
    # Each modeling module defines the rotary application that matches its own cos/sin layout.
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    with torch.no_grad():
        rotated, _ = rotate(queries, queries, cos, sin)
    return rotated
