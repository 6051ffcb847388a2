"""The Serve endpoint over real HTTP on 127.0.0.1, with Ray token auth on.

One Ray and Serve for the module, started by jobs/serve.py as a user would, with two
applications of the demo model: `/` (8 slots, two local image servers on the allow-list, one of
them slow) and `/tight` (one slot, one queued request, up to 280 tokens, a 1 MB body limit; a
second jobs/serve.py attached to the same Ray) for backpressure, clients that go away and the
replica's own body limit. Answers are checked against `LLM.generate` of the same requests.
"""

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from elastic_ray import LLM, CacheConfig, EngineConfig, SamplingParams
from elastic_ray.data.images import decode_image
from elastic_ray.data.shapes import CAPTION_INSTRUCTION, make_scenes, png_bytes
from elastic_ray.models.loading import load
from elastic_ray.serving.api import APIError, check, parse_request
from elastic_ray.serving.app import settled_text
from elastic_ray.serving.settings import ServeConfig
from conftest import http_image_server
from processes import Service
from test_images import png_header_only

pytestmark = pytest.mark.slow  # One Ray and Serve for the module (jobs/serve.py)

REPO = Path(__file__).parents[1]
MAX_TOKENS = 24
TIGHT_MAX_TOKENS = 280  # /tight allows requests long enough to go away from
KV_MEMORY = 64 * 2**20
LONG_TEXT = "describe the image . " * 120  # ~480 tokens: over the demo model's prompt limit
SLOW_S = 6.0  # the slow image host's delay, under the default fetch deadline of 10 s
TIGHT_BODY_BYTES = 1_000_000  # /tight's replica refuses larger bodies; the proxy's limit is the default 20 MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def chat(url: str | None, text: str = CAPTION_INSTRUCTION, **fields) -> dict:
    content = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "temperature": 0.0, **fields}


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(32, seed=3, split="test")


@pytest.fixture(scope="module")
def image_log():
    """(method, path) of every request the image server got."""
    return []


@pytest.fixture(scope="module")
def image_server(scenes, image_log):
    """Serves /allowed/scene.png, /allowed/redirect (to /other/scene.png) and /other/scene.png."""
    with http_image_server(png_bytes(scenes[0].image), {"/allowed/scene.png", "/other/scene.png"},
                           {"/allowed/redirect": "/other/scene.png"}, log=image_log) as url:
        yield url


@pytest.fixture(scope="module")
def slow_image_server(scenes):
    """An allow-listed host that answers each request after SLOW_S seconds."""
    with http_image_server(png_bytes(scenes[0].image), {"/allowed/scene.png"}, delay_s=SLOW_S) as url:
        yield url


def start_serve_job(args: list[str], env: dict, log: Path) -> tuple[Service, str]:
    """jobs/serve.py in its own session; returns it and its "serving ..." line once it serves."""
    job = Service(f"jobs/serve.py {' '.join(args)}", [sys.executable, "jobs/serve.py", *args], log, cwd=REPO, env=env)
    try:
        line = job.wait_for(lambda: next((l for l in log.read_text().splitlines() if l.startswith("serving ")), None),
                            240, 'its "serving" line')
    except BaseException:
        job.stop()
        raise
    return job, line


@pytest.fixture(scope="module")
def serve_jobs(image_server, slow_image_server, tmp_path_factory):
    """jobs/serve.py on a new local Ray (token auth on) serving `/`, and a second jobs/serve.py that
    attaches to that Ray and serves `/tight`; yields them and the base URL."""
    logs = tmp_path_factory.mktemp("serve-logs")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    common = ["--port", str(port), "--max-tokens", str(MAX_TOKENS), "--kv-cache-memory", str(KV_MEMORY),
              "--max-pixels", "1000000"]
    main, line = start_serve_job([*common, "--max-num-seqs", "8", "--max-queued-requests", "32",
                                  "--allow-images-from", f"{image_server}/allowed/",
                                  "--allow-images-from", f"{slow_image_server}/allowed/"], env, logs / "main.log")
    url, jobs = f"http://127.0.0.1:{port}", [main]
    try:
        assert line.startswith(f"serving demo at {url}/v1 on the Ray at "), line
        tight, _ = start_serve_job([*common, "--address", line.split("on the Ray at ")[1].split()[0], "--name", "tight",
                                    "--route-prefix", "/tight", "--max-num-seqs", "1", "--max-ongoing-requests", "1",
                                    "--max-queued-requests", "1", "--max-tokens", str(TIGHT_MAX_TOKENS),
                                    "--max-body-bytes", str(TIGHT_BODY_BYTES)],
                                   env, logs / "tight.log")
        jobs.insert(0, tight)
        yield jobs, url
    finally:
        codes = [job.stop(signal.SIGTERM, grace=60) for job in jobs]  # as a process manager would
    assert codes == [0] * len(codes), [(logs / name).read_text()[-3000:] for name in ("tight.log", "main.log")]


@pytest.fixture
def server(serve_jobs):
    """The module's base URL, its servers checked before each test: a test after one died fails at
    once, with its log."""
    jobs, url = serve_jobs
    for job in jobs:
        job.check()
    return url


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def reference(demo, cache: CacheConfig, requests: list[dict], max_tokens: int, stop=()) -> list:
    engine = EngineConfig(kv_cache_memory=KV_MEMORY, max_num_seqs=8, max_tokens=MAX_TOKENS)
    return LLM(demo, cache=cache, engine=engine).generate(requests, SamplingParams(max_tokens=max_tokens, stop=stop))


def healthy(url: str) -> bool:
    response = httpx.get(f"{url}/healthz")
    return response.status_code == 200 and response.json()["status"] == "ok"


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))


def stream(url: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# --- Answers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_32_concurrent_requests_get_what_llm_generate_gives(server, scenes, demo):
    texts = [CAPTION_INSTRUCTION if i % 2 == 0 else s.qa[i % len(s.qa)][0] for i, s in enumerate(scenes)]
    pngs = [png_bytes(s.image) for s in scenes]
    full = set(range(3, 32, 4))  # every fourth request asks for the full cache; the rest use the default
    bodies = [chat(data_url(png), text, max_tokens=MAX_TOKENS - 8 * (i % 2),
                   **({"method": "full"} if i in full else {})) for i, (png, text) in enumerate(zip(pngs, texts))]
    responses = asyncio.run(post_all(server, bodies))

    requests = [{"image": decode_image(png), "prompt": text} for png, text in zip(pngs, texts)]
    expected = {}
    for cache, indices in ((CacheConfig("elastic-vl", 0.6), [i for i in range(32) if i not in full]),
                           (CacheConfig("full", 1.0), sorted(full))):
        for max_tokens in {MAX_TOKENS - 8 * (i % 2) for i in indices}:
            chosen = [i for i in indices if MAX_TOKENS - 8 * (i % 2) == max_tokens]
            outputs = reference(demo, cache, [requests[i] for i in chosen], max_tokens)
            expected.update(zip(chosen, outputs))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        answer, want = response.json(), expected[i]
        assert answer["object"] == "chat.completion" and answer["model"] == "demo"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": want.text}, i
        assert answer["choices"][0]["finish_reason"] == want.finish_reason
        assert answer["usage"] == {"prompt_tokens": want.stats["prompt_tokens"],
                                   "completion_tokens": want.stats["output_tokens"],
                                   "total_tokens": want.stats["prompt_tokens"] + want.stats["output_tokens"]}
        assert answer["kv_cache"] == {k: want.stats[k] for k in ("method", "budget", "kv_bytes", "kv_bytes_full")}
    assert {r.json()["kv_cache"]["method"] for r in responses} == {"elastic-vl", "full"}
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) > 8
    engines = httpx.get(f"{server}/healthz").json()["engines"]
    assert sorted((e["method"], e["budget"]) for e in engines) == [("elastic-vl", 0.6), ("full", 1.0)]


@pytest.mark.slow
def test_streamed_chunks_add_up_to_the_answer(server, scenes):
    body = chat(data_url(png_bytes(scenes[1].image)), max_tokens=MAX_TOKENS)
    text = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = httpx.post(f"{server}/v1/chat/completions", json={**body, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop"
    for fields, expected in (({}, text), ({"stop": [stop]}, cut["choices"][0]["message"]["content"])):
        payloads = stream(server, {**body, **fields})
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
        assert len(chunks) > (3 if expected == text else 2)  # the text came in pieces
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_settled_text_holds_back_what_a_later_token_may_change():
    assert settled_text("a red ci", ()) == "a red ci"
    assert settled_text("a red ci", ("circle",)) == "a r"
    assert settled_text("a b \ufffd", ()) == "a b"
    assert settled_text("ab", ("long stop",)) == ""


@pytest.mark.slow
def test_the_openai_client_works_unchanged(server, scenes):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["demo"]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": CAPTION_INSTRUCTION},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(scenes[2].image))}}]}]
    answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0,
                                            extra_body={"method": "full", "budget": 1.0})
    text = answer.choices[0].message.content
    assert text and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.usage.total_tokens > answer.usage.prompt_tokens > 196
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0,
                                                 extra_body={"method": "full", "budget": 1.0}, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="demo", messages=messages, max_tokens=-1)
    assert error.value.body["param"] == "max_tokens"


# --- Bad input -------------------------------------------------------------------------------


def png(size=(32, 32)) -> bytes:
    return png_bytes(Image.new("RGB", size, (200, 30, 30)))


BAD = {
    "malformed json": (b'{"model": "demo", "messages": [', 400, "Invalid JSON"),
    "not an object": ([1, 2], 400, "object"),
    "no messages": ({"model": "demo"}, 400, "messages"),
    "empty messages": ({"model": "demo", "messages": []}, 400, "messages"),
    "no model": ({"messages": chat(data_url(png()))["messages"]}, 400, "model"),
    "no image": (chat(None), 400, "missing image"),
    "two images": (chat(data_url(png()), messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png())}},
        {"type": "image_url", "image_url": {"url": data_url(png())}}, {"type": "text", "text": "hi"}]}]),
        400, "one image per request"),
    "no text": (chat(data_url(png()), "  "), 400, "no text"),
    "undecodable image": (chat(data_url(b"not an image at all")), 400, "undecodable"),
    "truncated image": (chat(data_url(png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:300])), 400,
                        "undecodable"),
    "bad base64": (chat("data:image/png;base64,!!!!"), 400, "not valid base64"),
    "not an image url": (chat("file:///etc/passwd"), 400, "data: URL or an http"),
    "over the pixel limit": (chat(data_url(png_header_only(5000, 5000))), 400,
                             "5000x5000 = 25000000 pixels, over the limit of 1000000"),
    "thin image": (chat(data_url(png((1, 200)))), 400, "aspect ratio"),
    "negative max_tokens": (chat(data_url(png()), max_tokens=-5), 400, "greater than or equal to 1"),
    "zero max_tokens": (chat(data_url(png()), max_completion_tokens=0), 400, "greater than or equal to 1"),
    "absurd max_tokens": (chat(data_url(png()), max_tokens=10**12), 400, "over this server's limit"),
    "string max_tokens": (chat(data_url(png()), max_tokens="12"), 400, "valid integer"),
    "prompt over the context": (chat(data_url(png()), LONG_TEXT), 400, "over the engine's limit"),
    "unknown method": (chat(data_url(png()), method="magic"), 400, "unknown cache method"),
    "budget out of range": (chat(data_url(png()), budget=1.5), 400, "budget must be in"),
    "full below budget 1": (chat(data_url(png()), method="full", budget=0.5), 400, "budget must be 1.0"),
    "unknown cache option": (chat(data_url(png()), cache_options={"window": 4}), 400, "cache_options: method"),
    "cache option of the wrong type": (chat(data_url(png()), cache_options={"protect": "all"}), 400,
                                       "cache_options: elastic-vl option protect must be int"),
    "cache options not an object": (chat(data_url(png()), cache_options=[16]), 400, "cache_options"),
    "cache option too large": (chat(data_url(png()), cache_options={"offset": 10**30}), 400,
                               "cache_options: Value error, offset = 1000000000000000000000000000000 is outside"),
    "cache option beyond its method": (chat(data_url(png()), cache_options={"offset": 2**25}), 400,
                                       "cache_options: elastic-vl option offset must be in [1, 1048576]"),
    "unknown model": (chat(data_url(png()), model="gpt-4o"), 404, "does not exist"),
    "assistant turn": (chat(data_url(png()), messages=[{"role": "assistant", "content": "hi"}]), 400, "role"),
    "n above 1": (chat(data_url(png()), n=2), 400, "n: Input should be 1"),
    "temperature": (chat(data_url(png()), temperature=7), 400, "temperature"),
    "NaN temperature": (chat(data_url(png()), temperature=float("nan")), 400, "temperature"),  # JSON's NaN
    "infinite budget": (chat(data_url(png()), budget=1e400), 400, "budget"),
    "seed over int64": (chat(data_url(png()), seed=2**63), 400, "seed"),
    "cache option over int64": (chat(data_url(png()), cache_options={"offset": 2**64}), 400, "cache_options"),
    "cache option over int32": (chat(data_url(png()), cache_options={"sink": -(2**40)}), 400, "cache_options"),
    "nested cache option": (chat(data_url(png()), cache_options={"offset": [1]}), 400, "cache_options"),
    "layer budgets off the budget": (chat(data_url(png()), cache_options={"layer_budgets": [0.1, 0.2, 0.3]}), 400,
                                     "cache_options: layer_budgets [0.1, 0.2, 0.3] have mean 0.2, not the budget"),
    "layer budgets for another model": (chat(data_url(png()), budget=0.5, cache_options={"layer_budgets": [0.5, 0.5,
                                        0.4, 0.6]}), 400, "layer_budgets has 4 ratios but the model has 3 layers"),
    "layer budgets from a server file": (chat(data_url(png()), cache_options={"layer_budgets": "/etc/x.json"}), 400,
                                         "a calibration file is the server's own setting"),
    "many cache options": (chat(data_url(png()), cache_options={f"o{i}": 1 for i in range(99)}), 400,
                           "cache_options"),
    "long stop string": (chat(data_url(png()), stop="x" * 1000), 400, "stop"),
    "many messages": (chat(data_url(png()), messages=[{"role": "user", "content": "hi"}] * 1000), 400, "messages"),
    "instruction too long to tokenise": (chat(data_url(png()), "describe " * 100_000), 400,
                                         "more than a prompt of at most"),
    "escaped image url": (chat("http://127.0.0.1:9/allowed/%2e%2e/secret.png"), 400, "outside the allowed"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_and_the_server_keeps_answering(server, case):
    body, status, message = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert healthy(server)


@pytest.mark.slow
def test_unknown_routes_answer_in_the_openai_error_format(server):
    response = httpx.get(f"{server}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_http_images_only_from_the_allow_list(server, image_server, image_log):
    allowed = httpx.post(f"{server}/v1/chat/completions", json=chat(f"{image_server}/allowed/scene.png"), timeout=60)
    assert allowed.status_code == 200, allowed.text
    for path, message in (("/other/scene.png", "outside the allowed locations"),
                          ("/allowed/../other/scene.png", "outside the allowed locations"),
                          ("/allowed/%2e%2E/other/scene.png", "outside the allowed locations"),
                          ("/allowed/%252e%252e/other/scene.png", "double encoding"),
                          ("/allowed/..%2fother/scene.png", "encoded slash"),
                          ("/allowed/redirect", "redirects are not followed"),
                          ("/allowed/missing.png", "missing image")):
        response = httpx.post(f"{server}/v1/chat/completions", json=chat(f"{image_server}{path}"), timeout=60)
        assert response.status_code == 400 and message in response.json()["error"]["message"], (path, response.text)
    refused = httpx.post(f"{server}/tight/v1/chat/completions", json=chat(f"{image_server}/allowed/scene.png"))
    assert refused.status_code == 400 and "no allow-list" in refused.json()["error"]["message"]
    assert image_log and all(method == "GET" and path.startswith("/allowed/") for method, path in image_log)


@pytest.mark.slow
def test_a_full_queue_gets_429_with_retry_after(server, scenes):
    tight = f"{server}/tight"
    bodies = [chat(data_url(png_bytes(s.image)), max_tokens=MAX_TOKENS, ignore_eos=True) for s in scenes[:8]]
    responses = asyncio.run(post_all(tight, bodies))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
        else:
            assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert httpx.post(f"{tight}/v1/chat/completions", json=bodies[0], timeout=60).status_code == 200


# --- The jobs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_script_writes_a_run_directory(server, tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/load_test.py", "--url", server, "--requests", "4", "--concurrency", "2",
         "--max-tokens", "4", "--warmup", "1", "--output", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "load.json").read_text())
    assert report["kind"] == "serve_load" and report["device"].startswith("cpu")
    assert [(r["method"], r["budget"], r["ok"]) for r in report["results"]] == [("full", 1.0, 4), ("elastic", 0.5, 4)]
    for r in report["results"]:
        assert r["requests_per_s"] > 0 and 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    full, elastic = report["results"]
    assert elastic["kv_bytes_mean"] < full["kv_bytes_mean"] == full["kv_bytes_full_mean"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["completion_tokens"] for r in rows} == {4}
    assert "full 1.0: 4/4 ok" in result.stdout


def run_serve_job(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """jobs/serve.py under `-X importtime`: the result, the top-level packages it imported and its
    stderr lines other than import times."""
    result = subprocess.run([sys.executable, "-X", "importtime", "jobs/serve.py", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    return result, imported, [line for line in lines if not line.startswith("import time:")]


def test_serve_job_help_loads_neither_torch_nor_ray():
    result, imported, _ = run_serve_job("--help")
    assert result.returncode == 0 and "--max-body-bytes" in result.stdout and "--fetch-timeout" in result.stdout
    assert not imported & {"torch", "ray", "transformers"}, imported & {"torch", "ray", "transformers"}


@pytest.mark.slow
def test_serve_job_refuses_bad_arguments_before_ray_starts(tmp_path):
    result, imported, errors = run_serve_job("--budget", "2")
    assert result.returncode == 2 and "budget must be in (0, 1]" in result.stderr and "ray" not in imported
    result, imported, errors = run_serve_job("--model", "org/not-downloaded", HF_HUB_CACHE=str(tmp_path))
    assert result.returncode == 2 and "ray" not in imported
    assert errors == [f"serve.py: error: model 'org/not-downloaded' is neither 'demo', a local directory nor in the "
                      f"local Hugging Face cache ({tmp_path}); download it first (hf download org/not-downloaded)"]


def test_cache_options_come_from_the_request_or_for_the_default_method_from_the_server():
    config = ServeConfig(method="elastic", budget=0.5, cache_options={"protect": 16})
    image = data_url(png())
    assert check(parse_request(json.dumps(chat(image)).encode()), config).cache == \
        CacheConfig("elastic", 0.5, protect=16)
    own = chat(image, cache_options={"protect": 4, "merge": False})
    assert check(parse_request(json.dumps(own).encode()), config).cache == \
        CacheConfig("elastic", 0.5, protect=4, merge=False)
    vl_options = chat(image, cache_options={"importance": "instruction", "protect_text": True, "assign": "key"})
    assert check(parse_request(json.dumps(vl_options).encode()), config).cache == \
        CacheConfig("elastic", 0.5, importance="instruction", protect_text=True, assign="key")
    other_method = chat(image, method="h2o", budget=0.3)
    assert check(parse_request(json.dumps(other_method).encode()), config).cache == CacheConfig("h2o", 0.3)
    assert ServeConfig(cache_options='{"protect": 16}').cache_options == {"protect": 16}  # serve run key=value
    with pytest.raises(ValueError, match="no option"):
        ServeConfig(method="h2o", cache_options={"protect": 16})


def test_layer_budgets_come_as_ratios_from_a_request_and_as_a_calibration_file_from_the_server(tmp_path):
    curves = [[0.5, 1.0], [0.2, 1.0], [0.3, 1.0]]
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"version": 1, "method": "h2o", "layers": 3, "ratios": [0.1, 1.0], "retention": curves}))
    config = ServeConfig(method="h2o", budget=0.5, cache_options={"layer_budgets": str(path)})
    image = data_url(png())
    served = check(parse_request(json.dumps(chat(image)).encode()), config).cache.policy
    assert served.layer_budgets is not None and sum(served.layer_budgets) / 3 == pytest.approx(0.5)
    own = chat(image, cache_options={"layer_budgets": [0.4, 0.5, 0.6]})
    assert check(parse_request(json.dumps(own).encode()), config).cache.policy.layer_budgets == (0.4, 0.5, 0.6)
    for options, status, message in [
        ({"layer_budgets": "layers.json"}, 400, "a calibration file is the server's own setting"),
        ({"layer_budgets": [0.4, 0.5, 2.0]}, 400, "every ratio must be a number in (0, 1]"),
        ({"layer_budgets": [0.5, "x"]}, 400, "at most 1024 finite numbers"),
        ({"layer_budgets": "0.5 0.5 0.8"}, 400, "not the budget 0.5"),
    ]:
        with pytest.raises(APIError) as refused:
            check(parse_request(json.dumps(chat(image, cache_options=options)).encode()), config)
        assert refused.value.status == status and message in str(refused.value), options
    path.write_text("{broken")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ServeConfig(method="h2o", budget=0.5, cache_options={"layer_budgets": str(path)})


def aborted(url: str) -> int:
    return sum(engine["aborted"] for engine in httpx.get(f"{url}/healthz").json()["engines"])


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_goes_away_has_its_request_aborted(server, scenes, streaming):
    tight = f"{server}/tight"
    before = aborted(tight)
    body = chat(data_url(png_bytes(scenes[1].image)), max_tokens=TIGHT_MAX_TOKENS, ignore_eos=True, stream=streaming)
    if streaming:
        with httpx.stream("POST", f"{tight}/v1/chat/completions", json=body, timeout=60) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data: "))
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{tight}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.2))  # well under 280 steps
    deadline = time.time() + 60  # the request alone would run for its 280 tokens
    while aborted(tight) == before:
        assert time.time() < deadline, "the request was not aborted"
        time.sleep(0.2)
    assert aborted(tight) == before + 1 and healthy(tight)


# --- One request cannot hurt the others -------------------------------------------------------


def replica_created(url: str) -> int:
    """When the replica serving `url` started (a replaced replica has a later time)."""
    return httpx.get(f"{url}/v1/models").json()["data"][0]["created"]


def hostile_requests() -> list[tuple[dict, set[int]]]:
    """Requests that once broke a step (the loop stopped: every request 500, /healthz 503, Serve
    replacing the replica) or cost a replica much, with the answers they may get."""
    image = data_url(png())
    return [
        (chat(image, temperature=1e-40), {200}),  # greedy by the rule: logits / 1e-40 overflowed float32
        (chat(image, temperature=5e-324, top_p=0.5), {200}),
        (chat(image, temperature=1.0, top_p=1e-50), {200}),  # a top_p that rounds to 0 in float32 masked every token
        (chat(image, temperature=1.5, top_p=3e-46, seed=7), {200}),
        (chat(image, temperature=1.0, seed=-(2**63)), {200}),
        (chat(image, temperature=1.0, seed=2**70), {400}),  # made the engine's generator overflow
        (chat(image, cache_options={"offset": 2**70}), {400}),  # overflowed int64 in the step
        (chat(image, cache_options={"offset": 2**31 - 1, "sink": 2**31 - 1}), {200, 400}),  # the method may bound it
        (chat(image, "describe the image . " * 500_000), {400}),  # 10 MB: was tokenised on the engine thread
        (chat(data_url(png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:300])), {400}),
    ]


@pytest.mark.slow
def test_hostile_requests_next_to_normal_ones_leave_them_unaffected(server, scenes):
    normal = [chat(data_url(png_bytes(s.image)), max_tokens=MAX_TOKENS) for s in scenes[8:14]]
    expected = [r.json()["choices"][0]["message"]["content"] for r in asyncio.run(post_all(server, normal))]
    greedy = httpx.post(f"{server}/v1/chat/completions", json=chat(data_url(png())), timeout=60).json()
    created = replica_created(server)
    hostile = hostile_requests()
    mixed = [body for pair in zip([h for h, _ in hostile], normal + normal[:4]) for body in pair]
    responses = asyncio.run(post_all(server, mixed))
    for (body, allowed), response in zip(hostile, responses[0::2]):
        assert response.status_code in allowed, response.text
        if response.status_code == 400:
            assert response.json()["error"]["param"] in ("seed", "cache_options", "messages"), response.text
    for want, response in zip(expected + expected[:4], responses[1::2]):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == want
    # temperature 1e-40 is greedy by the rule
    assert responses[0].json()["choices"][0]["message"] == greedy["choices"][0]["message"]
    assert healthy(server) and replica_created(server) == created  # the replica never failed or restarted


@pytest.mark.slow
def test_a_10_mb_instruction_is_refused_without_holding_up_a_normal_request(server, scenes):
    huge = chat(data_url(png()), "describe the image . " * 500_000)
    normal = chat(data_url(png_bytes(scenes[4].image)), max_tokens=MAX_TOKENS)
    expected = httpx.post(f"{server}/v1/chat/completions", json=normal, timeout=60).json()["choices"][0]["message"]

    async def huge_next_to_normal():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            refused = [asyncio.create_task(client.post("/v1/chat/completions", json=huge)) for _ in range(4)]
            # tokenised on the engine thread, four of these held every request for minutes
            answer = await client.post("/v1/chat/completions", json=normal, timeout=30)
            return answer, await asyncio.gather(*refused)

    rss = []  # after each round: the first round's may include the worker threads' first allocations
    for _ in range(3):
        answer, refused = asyncio.run(huge_next_to_normal())
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"] == expected
        for response in refused:
            assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
            assert "more than a prompt of at most" in response.json()["error"]["message"]
        rss.append(httpx.get(f"{server}/healthz").json()["rss_bytes"])
    # 80 MB of instructions went through in the last two rounds: the replica keeps none of it
    # (tokenised, one kept 1 GB)
    assert rss[-1] - rss[0] < 64 * 2**20, rss


def raw_post(url: str, path: str, size: int, declared: bool) -> tuple[int, bytes]:
    """POST `size` bytes (declared in Content-Length, or chunked without one) while reading the
    answer; returns the bytes sent before the answer came and the answer's start."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    # `sent` counts what the kernel accepted; a send buffer left to autotune takes up to 4 MB that
    # the server never read (measured: 3.9 MB into a peer that reads nothing), so pin it small
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)
    sock.connect((host, int(port)))
    framing = f"Content-Length: {size}" if declared else "Transfer-Encoding: chunked"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    sock.sendall(head.encode())
    sent, answered = [0], threading.Event()

    def send():
        chunk = b"x" * 2**16
        frame = chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk)
        try:
            while sent[0] < size and not answered.is_set():
                sock.sendall(frame)
                sent[0] += len(chunk)
        except OSError:  # the server closed the connection after its answer
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sock.settimeout(120)
    with sock:
        answer = sock.recv(4096)
        answered.set()
        while not _whole_answer(answer):  # the head and the body may come in separate reads
            more = sock.recv(4096)
            if not more:
                break
            answer += more
        sender.join(30)
    return sent[0], answer


def _whole_answer(answer: bytes) -> bool:
    """Whether `answer` holds an HTTP response's head and its Content-Length bytes of body."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return len(body) >= int(lengths[0]) if lengths else False


@pytest.mark.slow
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_200_mb_body_is_refused_413_long_before_it_is_read(server, declared):
    sent, answer = raw_post(server, "/v1/chat/completions", 200 * 10**6, declared)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"request_too_large" in answer
    # the proxy reads up to its limit (20 MiB) and no further; a declared length is refused before any
    assert sent < (2**20 if declared else 20 * 2**20 + 16 * 2**20), sent
    assert healthy(server)


@pytest.mark.slow
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_the_replica_refuses_a_body_over_its_own_limit(server, declared):
    body = json.dumps(chat(data_url(png()), "x" * 2 * TIGHT_BODY_BYTES)).encode()
    content = body if declared else (body[i:i + 2**16] for i in range(0, len(body), 2**16))
    response = httpx.post(f"{server}/tight/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert f"over the limit of {TIGHT_BODY_BYTES} bytes" in response.json()["error"]["message"]


@pytest.mark.slow
def test_a_slow_image_host_delays_only_the_requests_that_use_it(server, slow_image_server, image_server, scenes):
    slow = chat(f"{slow_image_server}/allowed/scene.png", max_tokens=4)
    others = [chat(data_url(png_bytes(s.image)), max_tokens=4) for s in scenes[:3]]
    others.append(chat(f"{image_server}/allowed/scene.png", max_tokens=4))

    async def slow_then_others():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            async def finished(body):
                return await client.post("/v1/chat/completions", json=body), time.monotonic()

            # seven fetches at once: more than a replica's default worker threads (6 on 2 cores),
            # fewer than its fetch slots (8)
            slow_ones = [asyncio.create_task(finished(slow)) for _ in range(7)]
            await asyncio.sleep(1.0)
            others_done = await asyncio.gather(*(finished(b) for b in others))
            return await asyncio.gather(*slow_ones), others_done

    slow_done, others_done = asyncio.run(slow_then_others())
    assert all(r.status_code == 200 for r, _ in slow_done + others_done), [r.text for r, _ in slow_done + others_done]
    # every other request was answered while the slow host still held its own (each waits SLOW_S)
    assert max(t for _, t in others_done) < min(t for _, t in slow_done)
