"""One evaluation cell (a method at a budget) and a sweep of them against the full cache."""

import json
from dataclasses import dataclass

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.eval.metrics import perplexity, rouge_l, shapes_accuracy
from elastic_ray.eval.samples import Sample
from elastic_ray.flags import parse_cache_option
from elastic_ray.models.prompts import build_prompt

FULL = ("full", 1.0)


@dataclass(frozen=True)
class Cell:
    """A method, a budget and the method's options (for ablations)."""

    method: str
    budget: float
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        """The variant as `variant` reads it: `h2o recent_ratio=0`, `elastic protect_text=true`."""
        return self.method + "".join(f" {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.options)

    def cache(self) -> CacheConfig:
        return CacheConfig(self.method, self.budget, **dict(self.options))


def variant(text: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """`METHOD [KEY=VALUE ...]` (a cell's label) -> (method, options); values read as in --cache-option."""
    method, *options = text.split()
    return method, tuple(parse_cache_option(option) for option in options)


def grid(methods: list[str], budgets: list[float], ablations: list[str] = (),
         ablation_budgets: list[float] | None = None) -> list[Cell]:
    """The full cache first, then every method variant (`variant`) at every budget, then each
    ablation variant at the ablation budgets (default: the budgets)."""
    cells = [Cell(*FULL)]
    for spec, at in [(m, budgets) for m in methods] + [(a, ablation_budgets or budgets) for a in ablations]:
        method, options = variant(spec)
        cells += [Cell(method, b, options) for b in at if method != "full"]
    return cells


def end_token(model, tokenizer) -> int | None:
    """The token a model ends its answer with: the generation config's (first) EOS, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return (eos[0] if eos else None) if isinstance(eos, list) else eos


def answer_tokens(processor, sample: Sample, end: int | None = None) -> list[int]:
    """The reference answer's tokens as the model would write them after the prompt, then `end`
    (the EOS: so that a one-token answer still has a token scored against the compressed cache)."""
    prompt = build_prompt(processor, sample.instruction)
    space = "" if prompt[-1:].isspace() else " "
    tokens = processor.tokenizer(space + sample.reference.strip(), add_special_tokens=False).input_ids
    return tokens + ([] if end is None else [end])


def run_cell(model, processor, cell: Cell, samples: list[Sample], max_tokens: int,
             full_outputs: list[str] | None = None, engine: EngineConfig | None = None,
             score_ppl: bool = True) -> tuple[dict, list[str]]:
    """Greedy outputs and teacher-forced log-probabilities of `samples` under `cell`.

    Returns the cell's scores and its greedy texts. PPL is spec §8's on the reference followed by
    the EOS: the first answer token is scored from the full prompt pass, every later one against
    the compressed cache with the generation-stage rule applied after each step. With several
    kinds of samples (shapes captions, descriptions and questions) PPL and ROUGE-L are also given per kind
    (`ppl_caption`, `rouge_l_vqa`, ...).
    """
    end = end_token(model, processor.tokenizer)
    forced = [answer_tokens(processor, s, end) for s in samples] if score_ppl else []
    config = engine or EngineConfig(max_tokens=max([max_tokens, *map(len, forced)]))
    runner = Engine(model, processor, cell.cache().policy, config)
    requests = [{"image": s.image, "prompt": s.instruction} for s in samples]
    greedy = runner.generate(requests, SamplingParams(max_tokens=max_tokens))
    ok = [i for i, o in enumerate(greedy) if o.error is None]
    texts = [o.text if o.error is None else None for o in greedy]
    references = full_outputs or texts
    logprobs = dict(zip(ok, teacher_forced(runner, [requests[i] for i in ok], [forced[i] for i in ok]))) \
        if score_ppl else {}
    result = {
        "method": cell.method, "budget": cell.budget, "options": dict(cell.options), "label": cell.label,
        "samples": len(samples), "errors": len(samples) - len(ok),
        "kv_bytes_mean": sum(greedy[i].stats["kv_bytes"] for i in ok) / len(ok),
        "kv_bytes_full_mean": sum(greedy[i].stats["kv_bytes_full"] for i in ok) / len(ok),
        "slot_entries": sum(runner.slot_sizes) / len(runner.slot_sizes),  # per layer, on average
    }
    kinds = sorted({samples[i].kind for i in ok})
    for kind in ([None, *kinds] if len(kinds) > 1 else [None]):
        rows = [i for i in ok if kind in (None, samples[i].kind)]
        suffix = "" if kind is None else f"_{kind}"
        result["ppl" + suffix] = perplexity([logprobs[i] for i in rows]) if score_ppl else None
        result["rouge_l" + suffix] = rouge_l([texts[i] for i in rows], [references[i] for i in rows])
    if set(kinds) <= {"caption", "description", "vqa"}:
        result |= shapes_accuracy([samples[i].kind for i in ok], [texts[i] for i in ok],
                                  [samples[i].reference for i in ok])
    else:
        result["accuracy"] = None
    return result, texts


def teacher_forced(engine: Engine, requests: list[dict], forced: list[list[int]]) -> list[list[float]]:
    """Each request's forced tokens' log-probabilities, run batched on the engine."""
    ids = [engine.add_request(r, forced_tokens=f) for r, f in zip(requests, forced)]
    scored = {}
    while engine.has_unfinished():
        scored.update((o.request_id, o) for o in engine.step() if o.finished)
    return [scored[i].stats["logprobs"] for i in ids]


def sweep(model, processor, cells: list[Cell], samples: list[Sample], max_tokens: int, run_cells=None,
          log=lambda cell: None, score_ppl: bool = True) -> list[dict]:
    """Run the full-cache cell first, then every other cell against its outputs.

    `run_cells(cells, full_outputs)` may run the cells elsewhere (on Ray, in parallel); by
    default they run here, one after the other, each passed to `log` when done.
    """
    if cells[0] != Cell(*FULL):
        raise ValueError("a sweep starts with the full cache: it is the reference for ROUGE-L")

    def here(rest, full_outputs):
        results = []
        for cell in rest:
            results.append(run_cell(model, processor, cell, samples, max_tokens, full_outputs, score_ppl=score_ppl)[0])
            log(results[-1])
        return results

    full, full_outputs = run_cell(model, processor, cells[0], samples, max_tokens, score_ppl=score_ppl)
    log(full)
    return [full, *(run_cells or here)(cells[1:], full_outputs)]
