"""Writing a report: report.json (every figure with its provenance), report.md, and a self-contained
report.html with the plots embedded as data: URLs. Markdown and HTML render the same blocks."""

import base64
import html
import json
from pathlib import Path

from elastic_ray.report.figures import COLUMNS
from elastic_ray.report.provenance import NOT_MEASURED

STATUSES = ("measured: read from an input field; setting: the run's recorded configuration; assumed: not "
            "measured, given (the hourly price); derived: computed from the figures listed, by the formula shown; "
            "not measured: the inputs do not hold it (the reason is given). * marks a figure that depends on the "
            "assumed hourly price.")


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def cell(figure: dict) -> str:
    """A figure as a table cell: its value, '*' if it rests on an assumption, or 'not measured'."""
    if figure["status"] == NOT_MEASURED:
        return NOT_MEASURED
    return number(figure["value"]) + ("*" if figure.get("assumes") and figure["status"] != "assumed" else "")


def provenance(figure: dict) -> str:
    sources = "; ".join(f"{s['file']}: {s['field']}" for s in figure.get("sources", []))
    parts = [p for p in (figure.get("formula"), sources, figure.get("reason")) if p]
    return " | ".join(parts) if figure["status"] != NOT_MEASURED else figure["reason"]


def blocks(report: dict) -> list[tuple]:
    """The report as ("h1"|"h2"|"h3"|"p", text), ("table", header, rows) and ("img", title, file) blocks."""
    price = report["hourly_price"]
    out = [("h1", "Cost and throughput report"),
           ("p", f"Created {report['created']}. Hourly price: {number(price['value'])} USD per actor-hour "
                 f"(per GPU-hour on GPU runs), {price['sources'][0]['file']}: assumed, not measured."),
           ("p", "Figures: " + STATUSES),
           ("h2", "Inputs"),
           ("table", ["kind", "file", "model"], [[i["kind"], i["file"], i["model"]] for i in report["inputs"]]),
           ("h2", "Comparison across runs"),
           ("table", ["run", "model", "method", "budget", *COLUMNS.values()],
            [[r["label"], r["model"], r["method"], number(r["budget"]),
              *(cell(r["figures"][name]) for name in COLUMNS)] for r in report["rows"]]),
           ("h2", "Plots")]
    for plot in report["plots"].values():
        out.append(("img", plot["title"], plot["file"]) if plot["file"]
                   else ("p", f"{plot['title']}: not drawn, {plot['reason']}."))
    out.append(("h2", "Runs"))
    for r in report["rows"]:
        out += [("h3", f"{r['label']} ({r['model']})"), ("p", f"From {r['source']}."),
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
               if report["evaluations"] else ("p", "None among the inputs: quality is not measured."))
    return out


def markdown(report: dict) -> str:
    lines = []
    for block in blocks(report):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "img":
            lines += [f"![{block[1]}]({block[2]})", ""]
        else:
            escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
            lines += ["| " + " | ".join(map(escape, block[1])) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(map(escape, row)) + " |" for row in block[2]] + [""]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;text-align:left;vertical-align:top}"
         "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}")


def page(report: dict, out: Path) -> str:
    """Self-contained HTML: every plot read from `out` and embedded as a data: URL."""
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Cost and throughput report</title>", f"<style>{STYLE}</style></head><body>"]
    for block in blocks(report):
        kind, esc = block[0], html.escape
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "img":
            data = base64.b64encode((out / block[2]).read_bytes()).decode()
            parts.append(f'<figure><img alt="{esc(block[1])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(block[1])}</figcaption></figure>")
        else:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in block[2]]
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
