"""What an hour of a device costs: one price per device kind (a GPU, a CPU core), each an assumption."""

from elastic_ray.report.provenance import Figure, assumed

# USD per device-hour, assumed (not measured): about an on-demand cloud GPU, and one vCPU of an
# on-demand compute-optimised cloud instance. A GPU's price covers its host's CPUs.
DEFAULT_PRICES = {"GPU": 2.0, "CPU": 0.05}
FLAGS = {"GPU": "--gpu-hourly-price", "CPU": "--cpu-hourly-price"}


def prices(gpu: float | None = None, cpu: float | None = None) -> dict[str, Figure]:
    """The price of an hour of each device kind: the given one, else the default, both 'assumed'."""
    out = {}
    for kind, given in (("GPU", gpu), ("CPU", cpu)):
        if given is not None and not given > 0:
            raise ValueError(f"{FLAGS[kind]} must be positive, got {given}")
        origin = FLAGS[kind] if given is not None else "default (elastic_ray.report.prices.DEFAULT_PRICES)"
        out[kind] = assumed(DEFAULT_PRICES[kind] if given is None else given, f"USD per {kind}-hour", origin,
                            f"{kind.lower()}_hourly_price")
    return out
