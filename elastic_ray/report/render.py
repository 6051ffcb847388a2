"""Writing a report: report.json (every figure with its provenance), report.md, and a self-contained
report.html with the plots embedded as data: URLs. Markdown and HTML render the same blocks: a
headline table of at most 8 columns, detail tables of at most 8, plots, and a card per run."""

import base64
import html
import json
from pathlib import Path

from elastic_ray.report.prices import FLAGS
from elastic_ray.report.provenance import NOT_MEASURED

STATUSES = ("measured: read from an input field; setting: the run's recorded configuration; assumed: not "
            "measured, given (the prices); derived: computed from the figures listed, by the formula shown; "
            "not measured: the inputs do not hold it (the reason is given). * marks a figure that depends on an "
            "assumed price; - a figure that does not apply to the row.")

# The detail tables after the headline: heading, then {figure: column heading}, each at most 7 figures
# (with the run's label, 8 columns).
DETAILS = {
    "Work and throughput": {"rows": "rows", "errors": "errors", "input_tokens": "input tokens",
                            "generated_tokens": "generated tokens", "wall_s": "wall s", "rows_per_s": "rows/s",
                            "tokens_per_s": "generated tokens/s"},
    "Per device and start-up": {"rows_per_s_per_device": "rows/s per device",
                                "tokens_per_s_per_device": "generated tokens/s per device",
                                "steady_rows_per_s": "steady rows/s", "occupancy": "slot occupancy",
                                "ray_start_s": "Ray start s", "actor_start_s": "actor start s",
                                "first_row_s": "first row s"},
    "Time and cost": {"calibration_s": "budget calibration s", "quality_sample_s": "quality sample s",
                      "actor_hours": "actor-hours", "device_hours": "device-hours",
                      "hourly_price": "USD per device-hour", "captions_per_device_hour": "captions per device-hour",
                      "cost_per_million_captions": "USD per 1M captions"},
    "KV memory": {"kv_bytes_per_seq": "KV bytes/seq", "kv_bytes_full_per_seq": "full KV bytes/seq",
                  "kv_packing_factor": "KV packing", "slots_per_device": "slots/device",
                  "slots_per_device_full": "full slots/device", "slots_packing_factor": "slot packing"},
    "Fidelity and quality": {"fidelity_rouge_l": "sample ROUGE-L vs full cache", "fidelity_min_rouge": "threshold",
                             "degenerate": "degenerate sample captions", "quality_sample_rows": "sample rows",
                             "rouge_l": "evaluation ROUGE-L", "accuracy": "evaluation accuracy",
                             "ppl": "evaluation PPL"},
}
HEADLINE = ["run", "model", "devices", "captions per device-hour", "USD per 1M captions",
            "fidelity: ROUGE-L vs full cache on the run's sample", "KV packing (full / stored)", "errors"]


class Alert(str):
    """A table cell that warns (bold in Markdown, red in HTML)."""


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def cell(figure: dict | None) -> str:
    """A figure as a table cell: its value, '*' if it rests on an assumption, 'not measured', or '-'
    where the row has no such figure."""
    if figure is None:
        return "-"
    if figure["status"] == NOT_MEASURED:
        return NOT_MEASURED
    return number(figure["value"]) + ("*" if figure.get("assumes") and figure["status"] != "assumed" else "")


def provenance(figure: dict) -> str:
    sources = "; ".join(f"{s['file']}: {s['field']}" for s in figure.get("sources", []))
    parts = [p for p in (figure.get("formula"), sources, figure.get("reason")) if p]
    return " | ".join(parts) if figure["status"] != NOT_MEASURED else figure["reason"]


def below_threshold(row: dict) -> bool:
    return row["figures"]["fidelity_passed"]["value"] is False


def devices(row: dict) -> str:
    """"4 x 1 GPU": actors x devices per actor, and the device kind."""
    actors, per_actor = row["figures"]["actors"], row["figures"]["devices_per_actor"]
    if actors["status"] == NOT_MEASURED or per_actor["status"] == NOT_MEASURED:
        return f"{row['device']}s not recorded"
    return f"{number(actors['value'])} x {number(per_actor['value'])} {row['device']}"


def fidelity(row: dict) -> str:
    """The run's own fidelity: ROUGE-L on its sample, degenerate captions, and an alert below its threshold."""
    f = row["figures"]
    if f["fidelity_rouge_l"]["status"] == NOT_MEASURED:
        return NOT_MEASURED
    text = (f"{f['fidelity_rouge_l']['value']:.3f} on {cell(f['quality_sample_rows'])} rows, "
            f"{cell(f['degenerate'])} degenerate")
    if below_threshold(row):
        return Alert(f"BELOW THRESHOLD {cell(f['fidelity_min_rouge'])}: {text}")
    return text


def headline(row: dict) -> list[str]:
    f = row["figures"]
    errors = f"{cell(f['errors'])} of {cell(f['rows'])}"
    return [row["label"], row["model"], devices(row), cell(f["captions_per_device_hour"]),
            cell(f["cost_per_million_captions"]), fidelity(row), cell(f["kv_packing_factor"]), errors]


def warning(row: dict) -> str:
    f = row["figures"]
    return (f"{row['label']}: its captions scored ROUGE-L {f['fidelity_rouge_l']['value']:.3f} against the full "
            f"cache's on {cell(f['quality_sample_rows'])} rows of its own input ({cell(f['degenerate'])} degenerate), "
            f"below the run's threshold of {cell(f['fidelity_min_rouge'])}. Its captions are unlikely to be usable "
            "whatever they cost: rerun with a larger budget or other cache options.")


def prices(report: dict) -> str:
    parts = [f"{p['value']:.2f} {p['unit']} ({'given' if p['sources'][0]['file'] == FLAGS[kind] else 'the default'}, "
             f"{FLAGS[kind]})" for kind, p in report["prices"].items()]
    return ("Prices, assumed, not measured: " + "; ".join(parts) + ". A CPU actor is billed for its CPUs "
            "(cpus_per_actor), a GPU actor for its GPUs (a GPU's price covers its host). Device-hours: every actor's "
            "devices for the run's wall time, plus one actor's for a budget calibration and for the quality sample.")


def blocks(report: dict) -> list[tuple]:
    """The report as ("h1"|"h2"|"h3"|"p"|"warn", text), ("table", header, rows) and ("img", title, file) blocks."""
    rows = report["rows"]
    out = [("h1", "Cost and throughput report"), ("p", f"Created {report['created']}. {prices(report)}"),
           ("h2", "Headline")]
    out += [("warn", warning(r)) for r in rows if below_threshold(r)]
    out += [("table", HEADLINE, [headline(r) for r in rows]),
            ("p", "Fidelity: ROUGE-L F1 of the run's captions against the full cache's on a sample of its own input "
                  "(not measured for runs without one); degenerate: sample captions that repeat themselves. "
                  "Figures: " + STATUSES)]
    for title, columns in DETAILS.items():
        out += [("h2", title), ("table", ["run", *columns.values()],
                                [[r["label"], *(cell(r["figures"].get(name)) for name in columns)] for r in rows])]
    out.append(("h2", "Plots"))
    for plot in report["plots"].values():
        out.append(("img", plot["title"], plot["file"]) if plot["file"]
                   else ("p", f"{plot['title']}: not drawn, {plot['reason']}."))
    out += [("h2", "Inputs"),
            ("table", ["kind", "file", "model"], [[i["kind"], i["file"], i["model"]] for i in report["inputs"]]),
            ("h2", "Runs")]
    for r in rows:
        out += [("h3", f"{r['label']} ({r['model']})"), ("p", f"From {r['source']}; {devices(r)}."),
                ("table", ["figure", "value", "unit", "status", "from"],
                 [[name, cell(f), f["unit"], f["status"], provenance(f)] for name, f in r["figures"].items()])]
        if r["actors"]:
            names = [k for k in r["actors"][0] if k not in ("actor", "node")]
            out += [("p", "Per actor (rates over each actor's engine time):"),
                    ("table", ["actor", "node", *names],
                     [[a["actor"][:12], a["node"][:12], *(cell(a[k]) for k in names)] for a in r["actors"]])]
    out.append(("h2", "Evaluations used for quality"))
    out.append(("table", ["model", "file", "cells"],
                [[e["model"], e["file"], str(e["cells"])] for e in report["evaluations"]])
               if report["evaluations"] else ("p", "None among the inputs: evaluation quality is not measured."))
    return out


def markdown(report: dict) -> str:
    lines = []
    for block in blocks(report):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "warn":
            lines += [f"> **Warning:** {block[1]}", ""]
        elif kind == "img":
            lines += [f"![{block[1]}]({block[2]})", ""]
        else:
            def text(value) -> str:
                escaped = str(value).replace("|", "\\|")
                return f"**{escaped}**" if isinstance(value, Alert) else escaped
            lines += ["| " + " | ".join(map(text, block[1])) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(map(text, row)) + " |" for row in block[2]] + [""]
    return "\n".join(lines)


# Fixed table layout at the page's width, long names and paths broken anywhere: nothing runs off a
# 1280 px window.
STYLE = ("body{font-family:sans-serif;margin:1.5em auto;padding:0 1em;max-width:1200px;overflow-wrap:anywhere}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em;width:100%;table-layout:fixed}"
         "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;text-align:left;vertical-align:top}"
         "th{background:#f3f3f3}td.alert{color:#a00;font-weight:bold}"
         "p.warn{background:#fde8e8;border-left:4px solid #a00;padding:.5em 1em}"
         "figure{margin:1em 0}img{max-width:100%;height:auto;display:block}")


def page(report: dict, out: Path) -> str:
    """Self-contained HTML: every plot read from `out` and embedded as a data: URL."""
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>Cost and throughput report</title>", f"<style>{STYLE}</style></head><body>"]
    esc = html.escape
    for block in blocks(report):
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "warn":
            parts.append(f'<p class="warn"><strong>Warning:</strong> {esc(block[1])}</p>')
        elif kind == "img":
            data = base64.b64encode((out / block[2]).read_bytes()).decode()
            parts.append(f'<figure><img alt="{esc(block[1])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(block[1])}</figcaption></figure>")
        else:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block[1]) + "</tr>")
            parts += ["<tr>" + "".join(f'<td class="alert">{esc(v)}</td>' if isinstance(v, Alert)
                                       else f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in block[2]]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(report: dict, out: Path) -> list[Path]:
    """report.json, report.md and report.html under `out` (the plots are already there)."""
    paths = [out / "report.json", out / "report.md", out / "report.html"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    paths[2].write_text(page(report, out))
    return paths
