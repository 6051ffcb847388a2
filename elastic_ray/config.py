"""Plain configuration records: which cache method, how to sample, how large the engine is."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elastic_ray.kv import CachePolicy


class CacheConfig:
    """`CacheConfig(method="elastic", budget=0.5, offset=25, ...)`: a method, its budget and options.

    Validated at construction: an unknown method, a budget outside (0, 1] or an option the
    method does not have raises ValueError naming what is allowed.
    """

    def __init__(self, method: str = "full", budget: float = 1.0, **options):
        from elastic_ray.kv import make_policy  # torch, imported when a policy is first made

        self.method, self.budget, self.options = method, budget, dict(options)
        self.policy: CachePolicy = make_policy(method, budget, **options)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in sorted(self.options.items()))
        return f"CacheConfig(method={self.method!r}, budget={self.budget!r}{options})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheConfig) and self.policy == other.policy

    def __hash__(self) -> int:
        return hash(self.policy)

    def to_dict(self) -> dict:
        return {"method": self.method, "budget": self.budget, **self.options}


# Below this, a temperature or top_p samples greedily (SamplingParams stores temperature 0, top_p 1).
# Greedy is the limit of both as they go to 0, and the sampler's float32 arithmetic needs the bound:
# logits / temperature overflows to inf (softmax then gives NaN) once temperature is below
# |logit| / 3.4e38, and a top_p that rounds to 0 in float32 masks every token. At or above 1e-6
# neither happens for finite logits under 3.4e32; below it a top_p nucleus is the top token alone
# anyway for any vocabulary under a million tokens, as the top token's probability is at least 1 / vocab.
GREEDY_BELOW = 1e-6
INT64 = (-(2**63), 2**63 - 1)


class SamplingError(ValueError):
    """A sampling value that cannot run; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy, and so is a temperature or top_p below
    `GREEDY_BELOW`; `stop` strings end a sequence (not included); `seed` is an int64."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise SamplingError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not _number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise SamplingError("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", f"must be non-empty strings, got {self.stop!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not INT64[0] <= seed <= INT64[1]):
            raise SamplingError("seed", f"must be an integer in [-2**63, 2**63 - 1], got {seed!r}")
        if self.temperature < GREEDY_BELOW or self.top_p < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
            object.__setattr__(self, "top_p", 1.0)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes its KV slots.

    `kv_cache_memory` is bytes (int) or a fraction (float in (0, 1]) of the device's free memory;
    the slot count is `min(max_num_seqs, kv_cache_memory // slot_bytes)`. A slot holds the
    method's bound for `max_prompt_tokens + max_tokens` (None: the model's image tokens plus
    `TEXT_TOKENS`, within the context); longer requests are refused. `max_prefill_tokens` bounds the tokens of
    one prefill batch. `compile`: run each decode step as one `torch.compile`d graph (CUDA graphs on a
    GPU); None takes the device's default (`engine.default_compile`). `async_output`: read a step's
    sampled tokens back after launching the next step, so the host's work on them overlaps the
    device's next step (outputs come one step later); None takes the device's default
    (`engine.default_async_output`).
    """

    kv_cache_memory: int | float = 0.25
    max_num_seqs: int = 64
    max_prompt_tokens: int | None = None
    max_tokens: int = 256
    max_prefill_tokens: int = 8192
    compile: bool | None = None
    async_output: bool | None = None

    def __post_init__(self):
        memory = self.kv_cache_memory
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0 or (
            isinstance(memory, float) and memory > 1.0
        ):
            raise ValueError(f"kv_cache_memory must be bytes (int > 0) or a fraction in (0, 1], got {memory!r}")
        for name in ("max_num_seqs", "max_tokens", "max_prefill_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("compile", "async_output"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True, False or None, got {value!r}")
        prompt = self.max_prompt_tokens
        if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 1):
            raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {prompt!r}")
