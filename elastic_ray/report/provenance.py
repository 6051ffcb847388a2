"""A report figure and where it comes from: measured, a recorded setting, assumed, derived, or not measured."""

from dataclasses import dataclass, field

MEASURED, SETTING, ASSUMED, DERIVED, NOT_MEASURED = "measured", "setting", "assumed", "derived", "not measured"


@dataclass(frozen=True)
class Figure:
    """One number of the report. `sources` are the (file, field) pairs it follows from; a derived
    figure carries its formula, a figure that could not be measured its reason and no value."""

    value: float | int | None
    unit: str
    status: str
    sources: tuple[tuple[str, str], ...] = ()
    formula: str | None = None
    reason: str | None = None
    assumes: tuple[str, ...] = field(default=())

    @property
    def known(self) -> bool:
        return self.value is not None

    def as_json(self) -> dict:
        out = {"value": self.value, "unit": self.unit, "status": self.status}
        if self.sources:
            out["sources"] = [{"file": f, "field": name} for f, name in self.sources]
        if self.formula:
            out["formula"] = self.formula
        if self.assumes:
            out["assumes"] = list(self.assumes)
        if self.reason:
            out["reason"] = self.reason
        return out


def measured(value, unit: str, source: str, field_name: str) -> Figure:
    """A value read from an input file's field; a null field is 'not measured'."""
    if value is None:
        return not_measured(unit, f"{field_name} is null in {source}")
    return Figure(value, unit, MEASURED, ((source, field_name),))


def setting(value, unit: str, source: str, field_name: str) -> Figure:
    return Figure(value, unit, SETTING, ((source, field_name),))


def assumed(value, unit: str, origin: str, name: str) -> Figure:
    return Figure(value, unit, ASSUMED, ((origin, name),), assumes=(name,))


def not_measured(unit: str, reason: str) -> Figure:
    return Figure(None, unit, NOT_MEASURED, reason=reason)


def derive(unit: str, formula: str, compute, **inputs: Figure) -> Figure:
    """`compute(**values)` of known inputs, with their sources; 'not measured' when one is not known
    or the result is undefined (a division by zero)."""
    missing = dict.fromkeys(figure.reason for figure in inputs.values() if not figure.known)
    if missing:
        return not_measured(unit, f"{formula}: {'; '.join(missing)}")
    try:
        value = compute(**{name: figure.value for name, figure in inputs.items()})
    except ZeroDivisionError:
        return not_measured(unit, f"{formula}: division by zero")
    sources = tuple(dict.fromkeys(s for figure in inputs.values() for s in figure.sources))
    assumes = tuple(dict.fromkeys(a for figure in inputs.values() for a in figure.assumes))
    return Figure(value, unit, DERIVED, sources, formula, assumes=assumes)
