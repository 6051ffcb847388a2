"""Plain configuration records: which cache method, how to sample, how large the engine is."""

from dataclasses import dataclass, field

from elastic_ray.kv import CachePolicy, make_policy


class CacheConfig:
    """`CacheConfig(method="elastic", budget=0.5, offset=25, ...)`: a method, its budget and options.

    Validated at construction: an unknown method, a budget outside (0, 1] or an option the
    method does not have raises ValueError naming what is allowed.
    """

    def __init__(self, method: str = "full", budget: float = 1.0, **options):
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


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; `stop` strings end a sequence (not included)."""

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
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes its KV slots.

    `kv_cache_memory` is bytes (int) or a fraction (float in (0, 1]) of the device's free memory;
    the slot count is `min(max_num_seqs, kv_cache_memory // slot_bytes)`. A slot holds the
    method's bound for `max_prompt_tokens + max_tokens` (None: the model's image tokens plus
    `TEXT_TOKENS`, within the context); longer requests are refused. `max_prefill_tokens` bounds the scratch cache of
    one prefill batch.
    """

    kv_cache_memory: int | float = 0.25
    max_num_seqs: int = 64
    max_prompt_tokens: int | None = None
    max_tokens: int = 256
    max_prefill_tokens: int = 8192

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
        prompt = self.max_prompt_tokens
        if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 1):
            raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {prompt!r}")
