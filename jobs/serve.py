"""Serve a VLM behind an OpenAI-compatible chat completions API on Ray Serve, until interrupted.

    python jobs/serve.py --host 127.0.0.1 --port 8000 --model demo --method elastic --budget 0.5
    python jobs/serve.py --model llava-hf/llava-1.5-7b-hf --num-gpus 1 --num-replicas 2 --max-replicas 8 \\
        --allow-images-from https://images.example.com/public/

Starts a local Ray on 127.0.0.1 unless --address (or RAY_ADDRESS) names a cluster; a Ray it starts
puts the request body limit in front of Serve's HTTP proxy too (elastic_ray/serving/body.py). Bad
arguments, and a model that is neither 'demo', a local directory nor in the local Hugging Face
cache, exit with status 2 and one line before torch or Ray loads.
"""

import argparse
import os
import signal

from pydantic import ValidationError

from elastic_ray.flags import add_engine_flags, engine_settings, refuse
from elastic_ray.serving.settings import ServeConfig


def parser() -> argparse.ArgumentParser:
    d = ServeConfig.model_construct()  # the defaults, unvalidated: validating imports torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--name", default="elastic-ray", help="the Serve application's name")
    p.add_argument("--route-prefix", default="/", help="where the application's routes start")
    p.add_argument("--model", default=d.model, help="'demo', a local path or a hub id")
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model)")
    add_engine_flags(p, d)  # the default cache policy; a request may ask for another
    p.add_argument("--max-engines", type=int, default=d.max_engines,
                   help="engines (one per requested method and budget) a replica keeps")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--allow-images-from", action="append", default=[], metavar="PREFIX",
                   help="an http(s) URL prefix that image URLs may be fetched from (repeatable; default: none)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="the largest request body (413 beyond), image included")
    p.add_argument("--fetch-timeout", type=float, default=d.fetch_timeout_s,
                   help="seconds an image URL's fetch may take, connecting to last byte")
    p.add_argument("--max-concurrent-fetches", type=int, default=d.max_concurrent_fetches,
                   help="image URL fetches a replica runs at once")
    p.add_argument("--num-replicas", type=int, default=d.num_replicas, help="replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    p.add_argument("--max-ongoing-requests", type=int, help="requests a replica takes (default: 2 x --max-num-seqs)")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests the proxy queues when every replica is full; more get 429 (-1: no limit)")
    p.add_argument("--retry-after", type=float, default=d.retry_after_s, help="Retry-After seconds on a 429")
    p.add_argument("--num-cpus", type=float, default=d.num_cpus, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=d.num_gpus, help="GPUs per replica (> 0 loads the model on CUDA)")
    return p


def config_from(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        **engine_settings(args), model=args.model, served_model_name=args.served_model_name,
        max_engines=args.max_engines, max_pixels=args.max_pixels, allow_images_from=tuple(args.allow_images_from),
        max_body_bytes=args.max_body_bytes, fetch_timeout_s=args.fetch_timeout,
        max_concurrent_fetches=args.max_concurrent_fetches,
        num_replicas=args.num_replicas, max_replicas=args.max_replicas, max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests, retry_after_s=args.retry_after, num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from(args)
    except ValidationError as e:
        refuse(p, "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors()))
    from elastic_ray.models.loading import check_local_model

    try:
        check_local_model(config.model, config.max_tokens)
    except ValueError as e:
        refuse(p, str(e))
    import ray
    from ray import serve

    from elastic_ray.serving import build_app
    from elastic_ray.serving.body import MAX_BODY_BYTES_ENV, PROXY_CALLBACK

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # Ray's processes, the proxy's among them, inherit this environment
        os.environ.update({"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
                           MAX_BODY_BYTES_ENV: str(config.max_body_bytes)})
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on SIGTERM as on Ctrl-C
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name=args.name, route_prefix=args.route_prefix)
        base = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        ray_address = ray.get_runtime_context().gcs_address
        print(f"serving {config.name} at {base}/v1 on the Ray at {ray_address} (Ctrl-C stops)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        if address:
            serve.delete(args.name)
        else:
            serve.shutdown()
            ray.shutdown()

if __name__ == "__main__":
    main()
