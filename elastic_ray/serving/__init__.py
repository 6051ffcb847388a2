"""An OpenAI-compatible Ray Serve endpoint on the continuous-batching engine.

    POST /v1/chat/completions   one image and its instruction per request; `stream` for server-sent events
    GET  /v1/models
    GET  /healthz

    serve run elastic_ray.serving:build_app model=demo method=elastic budget=0.5
    python jobs/serve.py --model demo --method elastic --budget 0.5

`settings` is a deployment's configuration, `api` what a request may ask and how a bad one is
answered, `body` the request body's size limit (in the replica and in Serve's proxy), `app` the
replica and the Serve application. Only `app` imports Ray and torch; it loads on first use of
`build_app` or `ChatServer`, so a command line can parse its arguments first.
"""

import importlib

__all__ = ["ChatServer", "build_app"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'elastic_ray.serving' has no attribute {name!r}")
    return getattr(importlib.import_module("elastic_ray.serving.app"), name)
