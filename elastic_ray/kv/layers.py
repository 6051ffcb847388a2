"""Per-layer budgets (in the spirit of PrefixKV, NeurIPS 2025): layer l keeps the ratio b_l, and
the mean of the b_l is the budget, so the KV entries summed over layers stay the budget's.

The split comes as the option `layer_budgets` of every method, in one of two forms:

- the ratios themselves, a list (JSON `[0.3, 0.7, 0.5]`, or `"0.3 0.7 0.5"`): their mean must be
  the budget (within `MEAN_TOLERANCE`), each in (0, 1];
- a calibration file (a path ending in `.json`, written by `jobs/calibrate_layers.py`): per layer,
  the share of attention mass the method's own prompt stage keeps at each ratio of a grid (its
  retention curve). `solve_split` turns it into ratios for any budget: every layer reaches the
  same retention level, found by bisection so that the mean ratio is the budget.

A split whose ratios are all equal to the budget is no split (`None`): the uniform budget.
"""

import functools
import json
import math
from pathlib import Path

MEAN_TOLERANCE = 1e-3
MAX_LAYERS = 1024
CALIBRATION_VERSION = 1


def names_a_file(value) -> bool:
    """Whether a `layer_budgets` value is a calibration file (read from disk) rather than ratios."""
    return isinstance(value, str) and value.strip().endswith(".json")


def resolve_layer_budgets(value, budget: float, method: str) -> tuple[float, ...] | None:
    """The per-layer ratios an option value gives at `budget`; None for the uniform split.
    Raises ValueError naming what is wrong."""
    if value is None:
        return None
    if names_a_file(value):
        ratios = solve_split(load_calibration(value.strip(), method), budget)
    else:
        ratios = _ratios(value)
        mean = sum(ratios) / len(ratios)
        if abs(mean - budget) > MEAN_TOLERANCE:
            raise ValueError(f"layer_budgets {list(ratios)} have mean {mean:.6g}, not the budget {budget}")
    if all(r == budget for r in ratios):
        return None
    return ratios


def _ratios(value) -> tuple[float, ...]:
    """A list of ratios from a list or a space-separated string, each a number in (0, 1]."""
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or len(items) > MAX_LAYERS:
        raise ValueError(f"layer_budgets must be a list of 1 to {MAX_LAYERS} ratios in (0, 1] or a calibration "
                         f"file (.json), got {value!r}")
    ratios = []
    for item in items:
        try:
            ratio = float(item) if isinstance(item, str) else item
        except ValueError:
            ratio = None
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"layer_budgets: every ratio must be a number in (0, 1], got {item!r}")
        ratios.append(float(ratio))
    return tuple(ratios)


def load_calibration(path: str, method: str | None = None) -> dict:
    """A calibration file, checked: `ratios` an ascending grid in (0, 1] ending at 1, `retention` one
    curve per layer over that grid with values in [0, 1]; `method` (if given) the file's method."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise ValueError(f"layer_budgets: cannot read calibration file {path}: {error.strerror}") from None
    data = _checked_file(path, stat.st_mtime_ns, stat.st_size)
    if method is not None and data["method"] != method:
        raise ValueError(f"layer_budgets: {path} was calibrated for {data['method']!r}, not {method!r}")
    return data


@functools.lru_cache(maxsize=32)
def _checked_file(path: str, mtime_ns: int, size: int) -> dict:
    """The file's checked contents, read once per version of it (a replica whose own options name a
    file builds a policy per request). Callers must not modify the result."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"layer_budgets: cannot read calibration file {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"layer_budgets: {path} is not valid JSON: {error}") from None
    check_calibration(data, f"layer_budgets: {path}")
    return data


def check_calibration(data, where: str) -> None:
    """Raise ValueError unless `data` is a well-formed calibration record."""
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{where} is not a version-{CALIBRATION_VERSION} calibration record")
    grid, curves = data.get("ratios"), data.get("retention")
    if not isinstance(data.get("method"), str):
        raise ValueError(f"{where} names no method")
    if not _numbers(grid) or not all(0 < r <= 1 for r in grid) or list(grid) != sorted(set(grid)) or grid[-1] != 1:
        raise ValueError(f"{where}: ratios must be ascending numbers in (0, 1] ending at 1")
    if not isinstance(curves, list) or not 1 <= len(curves) <= MAX_LAYERS:
        raise ValueError(f"{where}: retention must hold one curve per layer")
    for layer, curve in enumerate(curves):
        if not _numbers(curve) or len(curve) != len(grid) or not all(0 <= v <= 1 for v in curve):
            raise ValueError(f"{where}: layer {layer}'s retention must be {len(grid)} numbers in [0, 1]")
    if data.get("layers") != len(curves):
        raise ValueError(f"{where}: layers is {data.get('layers')!r} but retention has {len(curves)} curves")


def _numbers(values) -> bool:
    return isinstance(values, list) and bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def ratio_for(grid: list[float], curve: list[float], level: float) -> float:
    """The smallest ratio at which a layer's retention reaches `level`, linear between grid points
    (the curve taken as its running maximum, so it never falls); the grid's first ratio at least."""
    curve = [max(curve[: i + 1]) for i in range(len(curve))]
    if level <= curve[0]:
        return grid[0]
    for i in range(1, len(grid)):
        if curve[i] >= level:
            rise = curve[i] - curve[i - 1]
            return grid[i - 1] + (grid[i] - grid[i - 1]) * (level - curve[i - 1]) / rise
    return 1.0


def solve_split(calibration: dict, budget: float, steps: int = 60) -> tuple[float, ...]:
    """Per-layer ratios with mean `budget` that give every layer the same retention level.

    A budget at or below the grid's first ratio, or 1, is split uniformly. Otherwise bisection on
    the level brackets the budget between two splits, and the answer is the point between them
    whose mean is the budget (the splits move with the level in steps where a curve is flat); if
    every layer reaches full retention below the budget, the rest is shared out towards 1.
    """
    grid, curves = calibration["ratios"], calibration["retention"]
    if budget <= grid[0] or budget >= 1.0:
        return tuple(budget for _ in curves)

    def split(level: float) -> list[float]:
        return [ratio_for(grid, curve, level) for curve in curves]

    def mean(ratios: list[float]) -> float:
        return sum(ratios) / len(ratios)

    if mean(split(1.0)) < budget:  # every layer keeps all its mass below the budget: share out the rest
        below, above = split(1.0), [1.0] * len(curves)
    else:
        low, high = 0.0, 1.0
        for _ in range(steps):
            middle = (low + high) / 2
            low, high = (middle, high) if mean(split(middle)) < budget else (low, middle)
        below, above = split(low), split(high)
    gap = mean(above) - mean(below)
    weight = 0.0 if gap == 0 else (budget - mean(below)) / gap
    return tuple(min(1.0, b + weight * (a - b)) for b, a in zip(below, above))
