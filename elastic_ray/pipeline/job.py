"""The caption job's settings, and the checks that run before any cluster work starts."""

from dataclasses import dataclass

import fsspec

from elastic_ray.data.images import MAX_PIXELS
from elastic_ray.data.shapes import CAPTION_INSTRUCTION


INPUT_FORMATS = ("parquet", "images", "webdataset")


class JobConfigError(ValueError):
    """A bad argument, found before any cluster work starts."""


@dataclass(frozen=True)
class CaptionJob:
    """Everything one captioning run needs. `check()` validates it without touching Ray."""

    input: str
    output: str
    model: str = "demo-v2"
    method: str = "elastic-vl"
    # the smallest budget (steps of 0.1) keeping 80 % of the full cache's exact demo-v2 captions
    # (README, "The captioning job"); or "auto": calibrated on the input, see `run`
    budget: float | str = 0.9
    cache_options: tuple[tuple[str, object], ...] = ()  # the method's options, e.g. (("protect", 16),)
    target_rouge: float = 0.9
    calibration_rows: int = 32
    quality_sample: int = 32  # rows captioned with the full cache too, to score the run's fidelity; 0: off
    min_rouge: float = 0.5  # under it, the run warns at the start
    max_tokens: int = 64
    instruction: str = CAPTION_INSTRUCTION
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 64
    batches_in_flight: int = 4  # batches an actor runs at once, sharing its engine's slots
    max_num_seqs: int = 16
    kv_cache_memory: int | float = 0.25  # per actor: bytes, or a fraction of the device's free memory
    resume: bool = False
    input_format: str = "auto"  # or "parquet", "images", "webdataset"
    allow_duplicate_ids: bool = False
    id_column: str = "id"
    image_column: str = "image"
    image_path_column: str | None = None
    instruction_column: str | None = None
    endpoint_url: str | None = None
    allow_images_from: tuple[str, ...] = ()
    max_pixels: int = MAX_PIXELS
    rows_per_file: int = 1000
    address: str | None = None
    progress: bool = True

    @property
    def storage_options(self) -> dict:
        return {"s3": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}

    @property
    def metrics_path(self) -> str:
        return self.output.rstrip("/") + ".metrics.json"

    def filesystem(self, path: str):
        """The fsspec filesystem for a path and the path without its protocol."""
        protocol = path.split("://", 1)[0] if "://" in path else "file"
        return fsspec.core.url_to_fs(path, **self.storage_options.get(protocol, {}))


def _positive(flag: str, value, *, integer: bool = True, zero: bool = False) -> None:
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or value < 0 or (value == 0 and not zero):
        kind = "integer" if integer else "number"
        raise JobConfigError(f"{flag} must be a {'non-negative' if zero else 'positive'} {kind}, got {value!r}")


def check_settings(job: CaptionJob) -> None:
    """Validate every argument; no Ray, no input read."""
    for name in ("max_tokens", "num_actors", "batch_size", "batches_in_flight", "max_num_seqs", "max_pixels",
                 "rows_per_file", "calibration_rows"):
        _positive("--" + name.replace("_", "-"), getattr(job, name))
    _positive("--quality-sample", job.quality_sample, zero=True)
    if isinstance(job.min_rouge, bool) or not isinstance(job.min_rouge, (int, float)) or not 0 <= job.min_rouge <= 1:
        raise JobConfigError(f"--min-rouge must be in [0, 1], got {job.min_rouge!r}")
    _positive("--gpus-per-actor", job.gpus_per_actor, integer=False, zero=True)
    _positive("--cpus-per-actor", job.cpus_per_actor, integer=False)
    _positive("--kv-cache-memory", job.kv_cache_memory, integer=False)
    if isinstance(job.kv_cache_memory, float) and job.kv_cache_memory > 1:
        raise JobConfigError(f"--kv-cache-memory as a fraction must be at most 1, got {job.kv_cache_memory!r}")
    from elastic_ray.config import CacheConfig  # torch: imported once arguments are parsed

    auto = job.budget == "auto"
    if auto and job.method == "full":
        raise JobConfigError("--budget auto chooses a budget for a compressing method; --method full keeps "
                             "every entry")
    try:
        CacheConfig(job.method, 0.5 if auto else job.budget, **dict(job.cache_options))
    except (ValueError, TypeError) as e:
        raise JobConfigError(f"bad cache settings: {e}") from e
    if auto and (isinstance(job.target_rouge, bool) or not isinstance(job.target_rouge, (int, float))
                 or not 0 < job.target_rouge <= 1):
        raise JobConfigError(f"--target-rouge must be in (0, 1], got {job.target_rouge!r}")
    if job.input_format not in ("auto", *INPUT_FORMATS):
        raise JobConfigError(f"--input-format must be auto or one of {', '.join(INPUT_FORMATS)}, "
                             f"got {job.input_format!r}")
    if not isinstance(job.instruction, str) or not job.instruction.strip():
        raise JobConfigError("instruction must be a non-empty string")
    _check_model(job)


def _check_model(job: CaptionJob) -> None:
    from elastic_ray.models.loading import check_local_model  # transformers: imported once arguments are parsed

    try:
        check_local_model(job.model, job.max_tokens)
    except ValueError as e:
        raise JobConfigError(f"--model, --max-tokens: {e}") from e
