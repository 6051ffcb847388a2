"""Packages whose names import on first use (PEP 562), so an entry point can parse its arguments
before torch, transformers and Ray load."""

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's `__getattr__`: `exports` maps each name to the module that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
