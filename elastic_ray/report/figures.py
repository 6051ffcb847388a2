"""The report's numbers, one row per measured configuration: a caption run, a benchmark arm, a
Serve load test's cache policy. Every figure records the input fields it follows from."""

from dataclasses import dataclass, field

from elastic_ray.report.inputs import Run
from elastic_ray.report.provenance import DERIVED, Figure, derive, measured, not_measured, setting
from elastic_ray.report.quality import quality

# The comparison table's columns and their headings, in order.
COLUMNS = {
    "rows": "rows", "errors": "errors", "input_tokens": "input tokens", "generated_tokens": "generated tokens",
    "wall_s": "wall s", "rows_per_s": "rows/s", "tokens_per_s": "generated tokens/s",
    "rows_per_s_per_actor": "rows/s per actor", "tokens_per_s_per_actor": "tokens/s per actor",
    "actor_hours": "actor-hours", "cost_per_million_captions": "USD per 1M captions",
    "kv_bytes_per_seq": "KV bytes/seq", "kv_bytes_full_per_seq": "full KV bytes/seq",
    "kv_packing_factor": "KV packing", "slots_per_device": "slots/device", "slots_per_device_full": "full slots/device",
    "slots_packing_factor": "slot packing", "rouge_l": "ROUGE-L", "accuracy": "accuracy",
}


@dataclass
class Row:
    """One measured configuration: what ran (model, method, budget) and its figures; `actors` holds
    per-actor figures where the input has them."""

    kind: str
    source: str
    label: str
    model: str
    method: str
    budget: float
    figures: dict[str, Figure]
    actors: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "label": self.label, "model": self.model,
                "method": self.method, "budget": self.budget,
                "figures": {name: figure.as_json() for name, figure in self.figures.items()},
                "actors": [{k: v.as_json() if isinstance(v, Figure) else v for k, v in a.items()} for a in self.actors]}


def _per_hour_and_cost(f: dict[str, Figure], gpu: bool, price: Figure) -> None:
    """Per-actor (per-GPU) rates, actor-hours, cost per 1M captions and the packing factors, in place."""
    f["rows_per_s_per_actor"] = derive("rows/s", "rows_per_s / actors", lambda r, a: r / a,
                                       r=f["rows_per_s"], a=f["actors"])
    f["tokens_per_s_per_actor"] = derive("tokens/s", "tokens_per_s / actors", lambda t, a: t / a,
                                         t=f["tokens_per_s"], a=f["actors"])
    if "calibration_s" in f:  # --budget auto ran one task with an actor's resources first
        f["actor_hours"] = derive("actor-hours", "(actors x wall_s + calibration_s) / 3600",
                                  lambda a, w, c: (a * w + c) / 3600, a=f["actors"], w=f["wall_s"], c=f["calibration_s"])
    else:
        f["actor_hours"] = derive("actor-hours", "actors x wall_s / 3600", lambda a, w: a * w / 3600,
                                  a=f["actors"], w=f["wall_s"])
    billed = "actor_hours"
    if gpu:
        for rate, unit in (("rows_per_s", "rows/s"), ("tokens_per_s", "tokens/s")):
            f[rate + "_per_gpu"] = derive(unit, f"{rate} / (actors x gpus_per_actor)", lambda r, a, g: r / (a * g),
                                          r=f[rate], a=f["actors"], g=f["gpus_per_actor"])
        f["gpu_hours"] = derive("GPU-hours", "actor_hours x gpus_per_actor", lambda h, g: h * g,
                                h=f["actor_hours"], g=f["gpus_per_actor"])
        billed = "gpu_hours"
    f["hourly_price"] = price
    f["cost_per_million_captions"] = derive(
        "USD per 1M captions", f"hourly_price x {billed} / rows x 1e6", lambda p, h, r: p * h / r * 1e6,
        p=price, h=f[billed], r=f["rows"])
    f["kv_packing_factor"] = derive("x", "kv_bytes_full_per_seq / kv_bytes_per_seq", lambda full, kv: full / kv,
                                    full=f["kv_bytes_full_per_seq"], kv=f["kv_bytes_per_seq"])
    f["slots_packing_factor"] = derive("x", "slots_per_device / slots_per_device_full", lambda s, full: s / full,
                                       s=f["slots_per_device"], full=f["slots_per_device_full"])


def _recorded(d: dict, key: str, unit: str, src: str) -> Figure:
    """A metrics field that runs from before it was recorded lack."""
    if d.get(key) is None:
        return not_measured(unit, f"the run's metrics have no {key}")
    return measured(d[key], unit, src, key)


def caption_rows(run: Run, price: Figure, evaluations: dict) -> list[Row]:
    """A caption run: its metrics file's totals, per-actor numbers and cost."""
    d, src = run.data, run.source
    gpus = d["settings"]["gpus_per_actor"]
    f = {
        "rows": measured(d["rows"], "rows", src, "rows"),
        "errors": measured(d["errors"], "rows", src, "errors"),
        "input_tokens": measured(d["prompt_tokens"], "tokens", src, "prompt_tokens"),
        "generated_tokens": measured(d["output_tokens"], "tokens", src, "output_tokens"),
        "wall_s": measured(d["wall_s"], "s", src, "wall_s"),
        "rows_per_s": measured(d["rows_per_s"], "rows/s", src, "rows_per_s"),
        "tokens_per_s": measured(d["output_tokens_per_s"], "tokens/s", src, "output_tokens_per_s"),
        "actors": measured(d["num_actors"], "actors", src, "num_actors"),
        "gpus_per_actor": setting(gpus, "GPUs", src, "settings.gpus_per_actor"),
        "kv_bytes_per_seq": measured(d["kv_bytes_per_seq"], "bytes", src, "kv_bytes_per_seq"),
        "kv_bytes_full_per_seq": measured(d["kv_bytes_full_per_seq"], "bytes", src, "kv_bytes_full_per_seq"),
        "slots_per_device": _recorded(d, "slots_per_actor", "slots", src),
        "slots_per_device_full": _recorded(d, "full_slots_per_actor", "slots", src),
    }
    if "budget_calibration" in d:
        f["calibration_s"] = measured(d["budget_calibration"]["wall_s"], "s", src, "budget_calibration.wall_s")
    _per_hour_and_cost(f, gpus > 0, price)
    f |= quality(d["model"], d["method"], d["budget"], evaluations)
    actors = []
    for i, a in enumerate(d["actors"]):
        name = f"actors[{i}]"
        entry = {"actor": a["actor"], "node": a["node"],
                 "rows": measured(a["rows"], "rows", src, f"{name}.rows"),
                 "errors": measured(a["errors"], "rows", src, f"{name}.errors"),
                 "engine_s": measured(a["engine_s"], "s", src, f"{name}.engine_s"),
                 "captions_per_engine_s": measured(a["captions_per_engine_s"], "captions/s", src,
                                                   f"{name}.captions_per_engine_s")}
        entry["tokens_per_engine_s"] = derive(
            "tokens/s", f"{name}.output_tokens / {name}.engine_s", lambda t, s: t / s,
            t=measured(a["output_tokens"], "tokens", src, f"{name}.output_tokens"), s=entry["engine_s"])
        if gpus > 0:
            entry["captions_per_engine_s_per_gpu"] = derive(
                "captions/s", "captions_per_engine_s / gpus_per_actor", lambda c, g: c / g,
                c=entry["captions_per_engine_s"], g=f["gpus_per_actor"])
        actors.append(entry)
    label = f"caption {d['method']} {d['budget']:g}"
    return [Row("caption", src, label, d["model"], d["method"], d["budget"], f, actors)]


def benchmark_rows(run: Run, price: Figure, evaluations: dict) -> list[Row]:
    """A benchmark: one row per arm and KV budget, all on one device; the full-cache engine arm at the
    same budget (eager where there are both) is the packing baseline."""
    d, src = run.data, run.source
    gpu = not d["device"].startswith("cpu")
    model = d.get("model", "unrecorded")

    def full_arm(arm: dict, key: str, unit: str) -> Figure:
        # at the same budget: the eager full-cache engine, else a compiled one, else generate()
        candidates = [(a["method"] != "full", a["compile"], i) for i, a in enumerate(d["arms"])
                      if a["kv_budget_bytes"] == arm["kv_budget_bytes"] and a["method"] in ("full", "generate")]
        if not candidates:
            return not_measured(unit, "the benchmark has no full-cache arm")
        full = min(candidates)[2]
        return measured(d["arms"][full][key], unit, src, f"arms[{full}].{key}")

    rows = []
    for i, arm in enumerate(d["arms"]):
        name = f"arms[{i}]"
        f = {
            "rows": measured(d["workload"]["requests"], "requests", src, "workload.requests"),
            "errors": not_measured("requests", "the benchmark records no per-request errors"),
            "input_tokens": not_measured("tokens", "the benchmark records only its longest prompt "
                                                   "(workload.prompt_tokens)"),
            "generated_tokens": measured(arm["generated_tokens"], "tokens", src, f"{name}.generated_tokens"),
            "wall_s": measured(arm["wall_s"], "s", src, f"{name}.wall_s"),
            "rows_per_s": measured(arm["requests_per_s"], "requests/s", src, f"{name}.requests_per_s"),
            "tokens_per_s": measured(arm["tokens_per_s"], "tokens/s", src, f"{name}.tokens_per_s"),
            "actors": setting(1, "actors", src, "device"),  # one process, one device
            "gpus_per_actor": setting(1 if gpu else 0, "GPUs", src, "device"),
            "kv_memory_bytes": setting(arm["kv_budget_bytes"], "bytes", src, f"{name}.kv_budget_bytes"),
            "kv_bytes_per_seq": measured(arm["kv_bytes_per_seq"], "bytes", src, f"{name}.kv_bytes_per_seq"),
            "kv_bytes_full_per_seq": full_arm(arm, "kv_bytes_per_seq", "bytes"),
            "slots_per_device": measured(arm["slots"], "slots", src, f"{name}.slots"),
            "slots_per_device_full": full_arm(arm, "slots", "slots"),
        }
        _per_hour_and_cost(f, gpu, price)
        f |= quality(model, arm["method"], arm["budget"], evaluations)
        rows.append(Row("benchmark", src, f"benchmark {arm['name']}", model, arm["method"], arm["budget"], f))
    return rows


def _request_sum(run: Run, method: str, budget: float, key: str) -> Figure:
    """A sum over the policy's successful requests in requests.jsonl."""
    if run.requests_source is None:
        return not_measured("tokens", f"no requests.jsonl beside {run.source}")
    values = [r[key] for r in run.requests if r["method"] == method and r["budget"] == budget and r["status"] == 200]
    return Figure(sum(values), "tokens", DERIVED, ((run.requests_source, key),),
                  f"sum of {key} over the policy's requests with status 200")


def serve_rows(run: Run, price: Figure, evaluations: dict) -> list[Row]:
    """A Serve load test: one row per cache policy; slots from the server's /healthz engines."""
    d, src = run.data, run.source
    engines = d["server"].get("engines", [])
    gpu = not d["device"].startswith("cpu")

    def slots(method: str, budget: float) -> Figure:
        for j, engine in enumerate(engines):
            if engine["method"] == method and engine["budget"] == budget:
                return measured(engine["slots"], "slots", src, f"server.engines[{j}].slots")
        return not_measured("slots", f"the server's /healthz lists no {method} {budget:g} engine")

    rows = []
    for i, r in enumerate(d["results"]):
        name, method, budget = f"results[{i}]", r["method"], r["budget"]
        f = {
            "rows": measured(r["requests"], "requests", src, f"{name}.requests"),
            "errors": derive("requests", f"{name}.requests - {name}.ok (rejected and failed)", lambda n, ok: n - ok,
                             n=measured(r["requests"], "requests", src, f"{name}.requests"),
                             ok=measured(r["ok"], "requests", src, f"{name}.ok")),
            "input_tokens": _request_sum(run, method, budget, "prompt_tokens"),
            "generated_tokens": _request_sum(run, method, budget, "completion_tokens"),
            "wall_s": measured(r["wall_s"], "s", src, f"{name}.wall_s"),
            "rows_per_s": measured(r["requests_per_s"], "requests/s", src, f"{name}.requests_per_s"),
            "tokens_per_s": measured(r["output_tokens_per_s"], "tokens/s", src, f"{name}.output_tokens_per_s"),
            "actors": not_measured("replicas", "load.json does not record how many replicas served"),
            "gpus_per_actor": not_measured("GPUs", "load.json does not record the replicas' GPUs"),
            "kv_bytes_per_seq": measured(r["kv_bytes_mean"], "bytes", src, f"{name}.kv_bytes_mean"),
            "kv_bytes_full_per_seq": measured(r["kv_bytes_full_mean"], "bytes", src, f"{name}.kv_bytes_full_mean"),
            "slots_per_device": slots(method, budget),
            "slots_per_device_full": slots("full", 1.0),
        }
        _per_hour_and_cost(f, gpu, price)
        f |= quality(d["model"], method, budget, evaluations)
        rows.append(Row("serve", src, f"serve {method} {budget:g}", d["model"], method, budget, f))
    return rows


ROWS = {"caption": caption_rows, "benchmark": benchmark_rows, "serve": serve_rows}


def rows_of(runs: list[Run], price: Figure, evaluations: dict) -> list[Row]:
    """Every row of every run but the evaluations (which supply quality)."""
    return [row for run in runs if run.kind in ROWS for row in ROWS[run.kind](run, price, evaluations)]
