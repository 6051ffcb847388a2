"""A decode step is static and sync-free: no host sync inside the forward, one transfer per step (the
sampled tokens), and shapes that depend only on the batch bucket and the width, for every method."""

import contextlib
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import INSTRUCTIONS
from elastic_ray import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine

METHODS = [("full", 1.0, {}), ("elastic", 0.5, {}), ("elastic", 0.3, {"positions": "compact"}), ("h2o", 0.5, {}),
           ("streaming", 0.5, {}), ("elastic-vl", 0.5, {}),
           ("elastic-vl", 0.5, {"layer_budgets": [0.3, 0.7]}), ("h2o", 0.5, {"layer_budgets": [0.3, 0.7]})]
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique"}  # item/int/bool, data-sized outputs


class SyncCounter(TorchDispatchMode):
    """Counts every operation that makes the host wait for the device, by phase and by source line:
    a scalar read (item, int, bool, float), an op whose output size depends on data (nonzero, a
    boolean-mask index), `tolist`/`numpy`, and a tensor built from Python data (a host-to-device
    copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.hits: Counter = Counter()
        self.phase = "step"

    def hit(self, kind: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "elastic_ray" in f.filename or "transformers" in f.filename]
        line = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.hits[self.phase, kind, line] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in SYNC_OPS or boolean_index:
            self.hit(name)
        return func(*args, **(kwargs or {}))

    def count(self, phase: str | None = None) -> int:
        return sum(n for (p, _, _), n in self.hits.items() if phase is None or p == phase)


@contextlib.contextmanager
def counting_syncs(engine: Engine):
    """A SyncCounter over whatever runs inside; the decode forward's own hits are in phase "forward"."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    original_tensor, original_forward = torch.tensor, engine.runner.forward

    def reads(name):
        def read(self, *args, **kwargs):
            counter.hit(name)
            return originals[name](self, *args, **kwargs)
        return read

    def tensor(data, *args, **kwargs):
        if not isinstance(data, torch.Tensor):
            counter.hit("tensor from Python data")
        return original_tensor(data, *args, **kwargs)

    def forward(*args, **kwargs):
        counter.phase = "forward"
        try:
            return original_forward(*args, **kwargs)
        finally:
            counter.phase = "step"

    for name in originals:
        setattr(torch.Tensor, name, reads(name))
    torch.tensor, engine.runner.forward = tensor, forward
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.tensor, engine.runner.forward = original_tensor, original_forward


def busy_engine(model, method, budget, options, images, n=4, max_tokens=24, slots=None, async_output=False):
    """An engine (n slots unless said) holding n requests of different lengths and sampling settings, prefilled."""
    engine = Engine(*model, CacheConfig(method, budget, **options).policy,
                    EngineConfig(max_num_seqs=slots or n, async_output=async_output))
    for i in range(n):
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.7 * (i % 2), top_p=0.9,
                                  seed=i if i == 1 else None)
        engine.add_request({"image": images[i % 3], "prompt": INSTRUCTIONS[i % 3]}, sampling)
    engine.step()
    assert len(engine.scheduler.running) == n and not engine.scheduler.waiting
    return engine


@pytest.mark.parametrize("async_output", [False, True], ids=["sync-output", "async-output"])
@pytest.mark.parametrize("method,budget,options", METHODS)
def test_a_decode_step_syncs_nothing_inside_the_forward_and_reads_back_only_the_tokens(
    method, budget, options, async_output, tiny_vlm, images
):
    if options.get("positions") == "compact" and tiny_vlm[0].config.model_type != "llava":
        pytest.skip("M-RoPE models rotate at the original positions only")
    engine = busy_engine(tiny_vlm, method, budget, options, images, async_output=async_output)
    steps = 12  # long enough for every method to evict
    with counting_syncs(engine) as counter:
        for _ in range(steps):
            engine.step()
    assert engine.steps["decode"] == steps
    assert counter.count("forward") == 0, counter.hits
    assert counter.hits == Counter({("step", "tolist", "readback.py:" + str(_tolist_line())): steps}), counter.hits


def test_teacher_forcing_reads_back_tokens_and_log_probabilities_in_one_transfer(tiny_llava, images):
    engine = busy_engine(tiny_llava, "elastic", 0.5, {}, images, n=2, slots=3)
    engine.add_request({"image": images[0], "prompt": "what"}, forced_tokens=[5, 6, 7, 8, 9, 10])
    while len(engine.scheduler.running) < 3:
        engine.step()
    with counting_syncs(engine) as counter:
        engine.step()
    assert counter.count("forward") == 0 and counter.count() == 1, counter.hits


def _tolist_line() -> int:
    """The line of the one read of a step's tokens (without log-probabilities) on the host."""
    import inspect

    from elastic_ray.engine import readback

    lines, start = inspect.getsourcelines(readback.Copy.read)
    return start + next(i for i, line in enumerate(lines) if "self.values[0].tolist()" in line)


def run_compiled(model, cache: CacheConfig, images, backend, monkeypatch):
    """Requests joining and finishing mid-flight on a compiled engine (graphs made by `backend`) and on
    an eager one; returns both outputs and the compiled engine."""
    torch._dynamo.reset()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **{**options, "backend": backend}))
    requests = [{"image": images[i % 3], "prompt": INSTRUCTIONS[i % 3]} for i in range(4)]
    outputs = {}
    for compiled in (True, False):
        engine = Engine(*model, cache.policy, EngineConfig(max_num_seqs=3, max_tokens=12, compile=compiled))
        for i, request in enumerate(requests):
            engine.add_request(request, SamplingParams(max_tokens=6 + 2 * i, ignore_eos=True), request_id=i)
        finished = {}
        while engine.has_unfinished():
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        outputs[compiled] = [finished[i].token_ids for i in range(len(requests))]
        if compiled:
            compiled_engine = engine
    return outputs[True], outputs[False], compiled_engine


@pytest.mark.slow
@pytest.mark.parametrize("method,budget,options", METHODS)
@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen"])
def test_the_decode_step_compiles_whole_into_one_graph_whatever_the_lengths_and_batch(method, budget, options, fixture, request,
                                                                    images, monkeypatch):
    model = request.getfixturevalue(fixture)
    if options.get("positions") == "compact" and fixture != "tiny_llava":
        pytest.skip("M-RoPE models rotate at the original positions only")
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    # fullgraph=True: a graph break would raise instead of splitting the step
    compiled, eager, engine = run_compiled(model, CacheConfig(method, budget, **options), images, count_graphs,
                                           monkeypatch)
    assert compiled == eager
    assert engine.compiled and engine.runner.buckets == [2, 3]
    # lengths changed at every step, and the running requests went 3, 2, 1 (buckets 3 and 2)
    assert len(graphs) == 1


@pytest.mark.slow
def test_inductor_compiled_steps_generate_what_eager_steps_do(tiny_llava, images, monkeypatch):
    compiled, eager, _ = run_compiled(tiny_llava, CacheConfig("elastic", 0.5), images, "inductor", monkeypatch)
    assert compiled == eager


def test_compiling_is_the_device_default_only_on_cuda(tiny_llava):
    assert not Engine(*tiny_llava, CacheConfig().policy, EngineConfig()).compiled
    assert Engine(*tiny_llava, CacheConfig().policy, EngineConfig(compile=True)).compiled
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        EngineConfig(compile="yes")
