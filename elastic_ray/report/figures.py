"""The report's numbers, one row per measured configuration: a caption run, a benchmark arm, a
Serve load test's cache policy. Every figure records the input fields it follows from."""

import re
from dataclasses import dataclass, field
from pathlib import Path

from elastic_ray.report.inputs import Run
from elastic_ray.report.provenance import DERIVED, Figure, derive, measured, not_measured, setting
from elastic_ray.report.quality import quality

# A caption run's own fidelity: a sample of its input captioned with the full cache too (metrics["quality_sample"]).
# Figure: (unit, field of quality_sample).
FIDELITY = {"fidelity_rouge_l": ("ROUGE-L F1 vs full cache", "rouge_l"),
            "fidelity_min_rouge": ("ROUGE-L F1", "min_rouge"), "fidelity_passed": ("passed", "passed"),
            "degenerate": ("captions", "degenerate"), "quality_sample_rows": ("rows", "rows")}
FIDELITY_UNITS = {name: unit for name, (unit, _) in FIDELITY.items()}
# Where a caption run's time went (metrics["timings"]), and how busy its engines' slots were.
TIMINGS = {"ray_start_s": "s", "actor_start_s": "s", "first_row_s": "s", "steady_rows_per_s": "rows/s"}
RUN_STATE = {"occupancy": "fraction of slots busy", **TIMINGS}
# Settings that name a run's place or its console, not what it measured: never in a label.
UNLABELLED = {"output", "progress", "resume", "address", "endpoint_url"}


@dataclass
class Row:
    """One measured configuration: what ran (model, method, budget) on which device kind ("GPU" or
    "CPU"), and its figures; `actors` holds per-actor figures where the input has them, `settings`
    the run's recorded settings (they tell apart rows that would share a label)."""

    kind: str
    source: str
    label: str
    model: str
    method: str
    budget: float
    device: str
    figures: dict[str, Figure]
    actors: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "label": self.label, "model": self.model,
                "method": self.method, "budget": self.budget, "device": self.device,
                "figures": {name: figure.as_json() for name, figure in self.figures.items()},
                "actors": [{k: v.as_json() if isinstance(v, Figure) else v for k, v in a.items()} for a in self.actors]}


def _rates_hours_and_cost(f: dict[str, Figure], device: str, prices: dict[str, Figure],
                          tasks: tuple[str, ...] = ()) -> None:
    """Per-device rates, actor- and device-hours (`tasks`, the seconds of one-actor tasks outside the
    run's wall time, billed too), cost per 1M captions, captions per device-hour and the packing
    factors, in place."""
    for rate, unit in (("rows_per_s", "rows/s"), ("tokens_per_s", "tokens/s")):
        f[rate + "_per_device"] = derive(f"{unit} per {device}", f"{rate} / (actors x devices_per_actor)",
                                         lambda r, a, d: r / (a * d),
                                         r=f[rate], a=f["actors"], d=f["devices_per_actor"])
    f["actor_hours"] = derive("actor-hours", f"(actors x wall_s{''.join(' + ' + t for t in tasks)}) / 3600",
                              lambda a, w, **task_s: (a * w + sum(task_s.values())) / 3600,
                              a=f["actors"], w=f["wall_s"], **{t: f[t] for t in tasks})
    f["device_hours"] = derive(f"{device}-hours", "actor_hours x devices_per_actor", lambda h, d: h * d,
                               h=f["actor_hours"], d=f["devices_per_actor"])
    f["hourly_price"] = prices[device]
    f["captions_per_device_hour"] = derive(f"captions per {device}-hour", "rows / device_hours", lambda r, h: r / h,
                                           r=f["rows"], h=f["device_hours"])
    f["cost_per_million_captions"] = derive(
        "USD per 1M captions", "hourly_price x device_hours / rows x 1e6", lambda p, h, r: p * h / r * 1e6,
        p=f["hourly_price"], h=f["device_hours"], r=f["rows"])
    f["kv_packing_factor"] = derive("x", "kv_bytes_full_per_seq / kv_bytes_per_seq", lambda full, kv: full / kv,
                                    full=f["kv_bytes_full_per_seq"], kv=f["kv_bytes_per_seq"])
    f["slots_packing_factor"] = derive("x", "slots_per_device / slots_per_device_full", lambda s, full: s / full,
                                       s=f["slots_per_device"], full=f["slots_per_device_full"])


def _recorded(d: dict, key: str, unit: str, src: str, field_name: str | None = None) -> Figure:
    """A metrics field that runs from before it was recorded lack."""
    field_name = field_name or key
    if d.get(key) is None:
        return not_measured(unit, f"the run's metrics have no {field_name}")
    return measured(d[key], unit, src, field_name)


def _absent(names: dict[str, str], reason: str) -> dict[str, Figure]:
    """Figures (name: unit) an input cannot hold, each 'not measured' for `reason`."""
    return {name: not_measured(unit, reason) for name, unit in names.items()}


def _fidelity(d: dict, src: str) -> dict[str, Figure]:
    """The run's quality sample: its ROUGE-L against the full cache, threshold, verdict, degenerate
    captions and size, and its seconds."""
    sample = d.get("quality_sample")
    if sample is None:
        return _absent(FIDELITY_UNITS, "the run's metrics have no quality_sample (a job from before it was measured, "
                                       "or run with --quality-sample 0)")
    f = {name: measured(sample.get(key), unit, src, f"quality_sample.{key}") for name, (unit, key) in FIDELITY.items()}
    if f["fidelity_min_rouge"].known:  # the threshold is the run's setting, not a measurement
        f["fidelity_min_rouge"] = setting(sample["min_rouge"], "ROUGE-L F1", src, "quality_sample.min_rouge")
    f["quality_sample_s"] = measured(sample.get("wall_s"), "s", src, "quality_sample.wall_s")
    return f


def _caption_label(d: dict) -> str:
    """method, budget (auto: the choice) and the cache options given."""
    settings = d.get("settings", {})
    budget = f"auto: {d['budget']:g}" if settings.get("budget") == "auto" else f"{d['budget']:g}"
    options = " ".join(f"{k}={v}" for k, v in dict(settings.get("cache_options") or {}).items())
    return " ".join(filter(None, ["caption", d["method"], budget, options]))


def caption_rows(run: Run, prices: dict[str, Figure], evaluations: dict) -> list[Row]:
    """A caption run: its metrics file's totals, fidelity, timings, per-actor numbers and cost."""
    d, src = run.data, run.source
    gpus = d["settings"]["gpus_per_actor"]
    device = "GPU" if gpus > 0 else "CPU"
    # the run's own rows and tokens: after a resume the metrics' totals are the whole output's
    run, at = (d["this_run"], "this_run.") if "this_run" in d else (d, "")
    f = {
        "rows": measured(run["rows"], "rows", src, at + "rows"),
        "errors": measured(run["errors"], "rows", src, at + "errors"),
        "input_tokens": measured(run["prompt_tokens"], "tokens", src, at + "prompt_tokens"),
        "generated_tokens": measured(run["output_tokens"], "tokens", src, at + "output_tokens"),
        "wall_s": measured(d["wall_s"], "s", src, "wall_s"),
        "rows_per_s": measured(d["rows_per_s"], "rows/s", src, "rows_per_s"),
        "tokens_per_s": measured(d["output_tokens_per_s"], "tokens/s", src, "output_tokens_per_s"),
        "actors": measured(d["num_actors"], "actors", src, "num_actors"),
        "devices_per_actor": (setting(gpus, "GPUs", src, "settings.gpus_per_actor") if gpus > 0 else
                              setting(d["settings"]["cpus_per_actor"], "CPUs", src, "settings.cpus_per_actor")),
        "kv_bytes_per_seq": measured(d["kv_bytes_per_seq"], "bytes", src, "kv_bytes_per_seq"),
        "kv_bytes_full_per_seq": measured(d["kv_bytes_full_per_seq"], "bytes", src, "kv_bytes_full_per_seq"),
        "slots_per_device": _recorded(d, "slots_per_actor", "slots", src),
        "slots_per_device_full": _recorded(d, "full_slots_per_actor", "slots", src),
        "occupancy": _recorded(d, "occupancy", RUN_STATE["occupancy"], src),
    }
    timings = d.get("timings") or {}
    f |= {name: _recorded(timings, name, unit, src, f"timings.{name}") for name, unit in TIMINGS.items()}
    if "budget_calibration" in d:
        f["calibration_s"] = measured(d["budget_calibration"]["wall_s"], "s", src, "budget_calibration.wall_s")
    f |= _fidelity(d, src)
    # a quality sample measured inside a caption actor while the run went on (`in_run`) is in the
    # run's wall time already; one that ran as a task of its own is billed like a calibration
    in_run = (d.get("quality_sample") or {}).get("in_run", False)
    tasks = tuple(t for t in ("calibration_s", "quality_sample_s") if t in f and not (in_run and t == "quality_sample_s"))
    _rates_hours_and_cost(f, device, prices, tasks)
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
        entry["captions_per_engine_s_per_device"] = derive(
            f"captions/s per {device}", "captions_per_engine_s / devices_per_actor", lambda c, g: c / g,
            c=entry["captions_per_engine_s"], g=f["devices_per_actor"])
        entry["occupancy"] = _recorded(a, "occupancy", RUN_STATE["occupancy"], src, f"{name}.occupancy")
        entry["wait_s"] = _recorded(a, "wait_s", "s", src, f"{name}.wait_s")
        actors.append(entry)
    return [Row("caption", src, _caption_label(d), d["model"], d["method"], d["budget"], device, f, actors,
                d["settings"])]


def _cpu_threads(device: str, src: str) -> Figure:
    """The CPUs a CPU benchmark ran on: the torch threads its device string names, "cpu (N threads)"."""
    found = re.fullmatch(r"cpu \((\d+) threads?\)", device)
    if found is None:
        return not_measured("CPUs", f"the device {device!r} names no thread count")
    return setting(int(found[1]), "CPUs", src, "device")


def benchmark_rows(run: Run, prices: dict[str, Figure], evaluations: dict) -> list[Row]:
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
            "devices_per_actor": setting(1, "GPUs", src, "device") if gpu else _cpu_threads(d["device"], src),
            "kv_memory_bytes": setting(arm["kv_budget_bytes"], "bytes", src, f"{name}.kv_budget_bytes"),
            "kv_bytes_per_seq": measured(arm["kv_bytes_per_seq"], "bytes", src, f"{name}.kv_bytes_per_seq"),
            "kv_bytes_full_per_seq": full_arm(arm, "kv_bytes_per_seq", "bytes"),
            "slots_per_device": measured(arm["slots"], "slots", src, f"{name}.slots"),
            "slots_per_device_full": full_arm(arm, "slots", "slots"),
            **_absent(RUN_STATE, "the benchmark records no engine occupancy or start-up timings"),
            **_absent(FIDELITY_UNITS, "a benchmark measures throughput (random weights, forced lengths), not fidelity"),
        }
        _rates_hours_and_cost(f, "GPU" if gpu else "CPU", prices)
        f |= quality(model, arm["method"], arm["budget"], evaluations)
        rows.append(Row("benchmark", src, f"benchmark {arm['name']}", model, arm["method"], arm["budget"],
                        "GPU" if gpu else "CPU", f))
    return rows


def _request_sum(run: Run, method: str, budget: float, key: str) -> Figure:
    """A sum over the policy's successful requests in requests.jsonl."""
    if run.requests_source is None:
        return not_measured("tokens", f"no requests.jsonl beside {run.source}")
    values = [r[key] for r in run.requests if r["method"] == method and r["budget"] == budget and r["status"] == 200]
    return Figure(sum(values), "tokens", DERIVED, ((run.requests_source, key),),
                  f"sum of {key} over the policy's requests with status 200")


def serve_rows(run: Run, prices: dict[str, Figure], evaluations: dict) -> list[Row]:
    """A Serve load test: one row per cache policy; slots from the server's /healthz engines."""
    d, src = run.data, run.source
    engines = d["server"].get("engines", [])
    device = "CPU" if d["device"].startswith("cpu") else "GPU"

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
            "devices_per_actor": not_measured(f"{device}s", f"load.json does not record the replicas' {device}s"),
            "kv_bytes_per_seq": measured(r["kv_bytes_mean"], "bytes", src, f"{name}.kv_bytes_mean"),
            "kv_bytes_full_per_seq": measured(r["kv_bytes_full_mean"], "bytes", src, f"{name}.kv_bytes_full_mean"),
            "slots_per_device": slots(method, budget),
            "slots_per_device_full": slots("full", 1.0),
            **_absent(RUN_STATE, "load.json records no engine occupancy or start-up timings"),
            **_absent(FIDELITY_UNITS, "a load test sends forced-length requests (ignore_eos) and samples no fidelity"),
        }
        _rates_hours_and_cost(f, device, prices)
        f |= quality(d["model"], method, budget, evaluations)
        rows.append(Row("serve", src, f"serve {method} {budget:g}", d["model"], method, budget, device, f))
    return rows


ROWS = {"caption": caption_rows, "benchmark": benchmark_rows, "serve": serve_rows}


def distinct_labels(rows: list[Row]) -> None:
    """Rows that share a label get the settings in which they differ ("max_tokens=32"), and rows whose
    settings are the same too get their input file's name; in place."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    for label, group in groups.items():
        if len(group) == 1:
            continue
        keys = [k for k in dict.fromkeys(k for row in group for k in row.settings) if k not in UNLABELLED
                and len({repr(row.settings.get(k)) for row in group}) > 1]
        for row in group:
            row.label = " ".join([label, *(f"{k}={row.settings.get(k)}" for k in keys)])
        if len({row.label for row in group}) < len(group):
            for row in group:
                row.label += f" ({Path(row.source).name})"


def rows_of(runs: list[Run], prices: dict[str, Figure], evaluations: dict) -> list[Row]:
    """Every row of every run but the evaluations (which supply quality), each with its own label."""
    rows = [row for run in runs if run.kind in ROWS for row in ROWS[run.kind](run, prices, evaluations)]
    distinct_labels(rows)
    return rows
