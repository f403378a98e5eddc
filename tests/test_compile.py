"""The compiled training step (issue 31, trainer/compiled.py): every zoo model's training forward and backward captured
as one graph (fullgraph: a graph break raises), under both data-parallel modes, with the numbers eager gives; a
compiled run killed mid-epoch resumes exactly.

Capture is checked with the `aot_eager` backend (dynamo and AOTAutograd, as inductor sees them, without generated
code: seconds rather than minutes a model); inductor's own numbers and compile times are bench figures
(docs/performance.md)."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, run_module
from models.objective import elbo_terms, training_loss
from models.registry import PAPER_MODELS, build_model, paper_config
from trainer.compiled import compile_training_forward, compiled_forward, default_cache_dir
from trainer.distributed import World
from trainer.invariant import SharedNoise
from trainer.metrics import read_step_records

TINY_FC = dict(hidden_dim=16, ch_enc=8, c_dim=4, z_dim=4, n_res=1)
# two blocks at some resolutions, so that repeated blocks reuse their compiled region
TINY_MULTISCALE = dict(hidden_dim=16, c_dim=4, z_dim=4, str_enc="32-2,16-1,8-1,4-1,2-1,1-1", str_gen="8-2,4-1,2-1,1-1",
                       str_dec="32-1,16-1,8-1")


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(paper_config(name, **(TINY_MULTISCALE if name.startswith("schavae") else TINY_FC))).train()


def batch() -> torch.Tensor:
    return (torch.rand(2, 3, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.7).float()


def two_steps(model: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> tuple:
    """Two forward/backward/Adam steps from the same noise stream: the losses and the gradients of the second."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    torch.manual_seed(5)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = training_loss(elbo_terms(model(x)), 1.0)
        loss.backward()
        losses.append(loss.detach())
        opt.step()
    return torch.stack(losses), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_model_trains_as_one_graph_with_eager_numbers(name):
    x = batch()
    eager_losses, eager_grads = two_steps(tiny(name), x)
    model = tiny(name)
    forward = compile_training_forward(model, "cpu", backend="aot_eager")
    losses, grads = two_steps(model, x)  # fullgraph=True: any graph break would raise here
    assert compiled_forward(model) is forward and forward.calls == 2
    assert torch.equal(losses, eager_losses)
    assert len(grads) == len(eager_grads)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_captured_graph_is_one_aotautograds_cache_accepts(name):
    """A warm start skips tracing forward and backward only for a graph AOTAutograd's on-disk cache accepts (its
    own check, which refuses e.g. custom autograd.Functions: models/gelu_conv.py's once made every warm SCHA-VAE
    start trace again, 77 s instead of 21 s)."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny(name)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=record)
    training_loss(elbo_terms(model(batch())), 1.0).backward()
    assert len(graphs) == 1
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert not any("autograd_function_apply" in op for op in ops), name
    check_cacheable(graphs[0])  # raises BypassAOTAutogradCache with the reason


def host_reads(fn) -> int:
    """How many times `fn()` brought a tensor's value to the host outside the optimizer's step: on a GPU each read
    waits for every kernel queued before it. `.item()`, `bool(t)`, `float(t)` dispatch `_local_scalar_dense`,
    counted from the profiler's op events (a dispatch mode would see them too but makes dynamo refuse the compiled
    call); `.tolist()` of a CPU tensor dispatches nothing, so it is counted at its Python entry. The optimizer is
    left out: a CPU's Adam (single-tensor or fused) reads each parameter's step count, in host memory there; the
    engines' fused Adam on a GPU keeps them on the device."""
    tolist, calls = torch.Tensor.tolist, []

    def counted_tolist(t):
        calls.append(1)
        return tolist(t)

    torch.Tensor.tolist = counted_tolist
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    events = prof.events()
    optimizer = [e.time_range for e in events if e.name.startswith("Optimizer.step#")]
    assert optimizer, "the step ran no optimizer step"
    return len(calls) + sum(e.name == "aten::_local_scalar_dense"
                            and not any(o.start <= e.time_range.start <= o.end for o in optimizer) for e in events)


def training_step(model: torch.nn.Module, guard_every: int, compile_: bool):
    """trainer/step.py's step on the benchmark's plain engine (Adam, clipping, the guard), as a run builds it."""
    from types import SimpleNamespace

    from trainer.config import TrainerConfig
    from trainer.fastpath import FastPath
    from trainer.guard import NonFiniteGuard
    from trainer.measure.plain import PlainEngine
    from trainer.step import TrainingStep

    guard = NonFiniteGuard(model, max_consecutive=5, every=guard_every)  # before the engine: the raw gradients
    fast = FastPath("fp32", False, guard_every, compile_, "aot_eager")
    engine = PlainEngine(model, SimpleNamespace(trainer=TrainerConfig()), 1, fast, torch.device("cpu"))
    return TrainingStep(engine, engine.optimizer, guard)


def test_a_compiled_step_reads_the_device_only_when_the_guard_checks():
    """The whole training step (compiled forward and backward, loss, guard, clipping) with the GPU's guard mode (a
    host check every N steps; N = 5 here, 20 on a GPU): no host read between checks, and the check step reads."""
    model = tiny("schavae")
    step, x = training_step(model, guard_every=5, compile_=True), batch()
    step(x, 1.0, 0)  # the capture
    reads, checked = [], []
    for i in range(1, 5):
        reads.append(host_reads(lambda: checked.append(step(x, 1.0, i).checked)))
    assert checked == [False] * 3 + [True]
    assert compiled_forward(model).calls == 5
    assert reads[:-1] == [0] * 3 and reads[-1] > 0, reads


def test_the_host_read_count_sees_the_guards_read_in_a_step_that_checks_every_time():
    """The counter's negative control: the CPU guard setting (guard_every 1) reads its flags in every step."""
    step, x = training_step(tiny("ns"), guard_every=1, compile_=False), batch()
    reads = [host_reads(lambda: step(x, 1.0, i)) for i in range(2)]
    assert all(n >= 1 for n in reads), reads


def test_schavae_compiles_under_bf16_autocast_and_evaluates_eagerly():
    x = batch()
    eager_losses, _ = two_steps(tiny("schavae"), x, autocast=True)
    model = tiny("schavae")
    forward = compile_training_forward(model, "cpu", backend="aot_eager")
    losses, _ = two_steps(model, x, autocast=True)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-3, atol=0.0)  # bf16 tolerance
    model.eval()
    with torch.no_grad():
        model(x)  # evaluation takes the eager forward: no second capture
    assert forward.calls == 2


def test_invariant_noise_at_world_size_2_is_traced_into_the_graph():
    """At W > 1 `data_parallel=invariant` draws each sample for the global batch from the shared stream (a torch
    function mode around the forward); compiled, the draws are the eager ones."""
    world = World(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"), backend="gloo")
    x = batch()
    results = []
    for compiled in (False, True):
        model = tiny("schavae")
        noise = SharedNoise(model, world, seed=3)
        if compiled:
            compile_training_forward(model, "cpu", backend="aot_eager")
        results.append((two_steps(model, x)[0], noise.generator.get_state()))
    (eager, eager_state), (compiled, compiled_state) = results
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_state, eager_state)  # the stream advanced by the same draws


def test_the_cache_defaults_under_the_users_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "scha-vae" / "inductor"


# ------------------------------------------------------------------------------------------------ a compiled run
@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory, omniglot_raw, omniglot_ns_shards):
    from test_reliability import args

    run_dir = tmp_path_factory.mktemp("compiled") / "run"
    argv = args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false", *COMPILED)
    proc = run_module("launch.train", *argv, cwd=ROOT)
    (run_dir / "console.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


COMPILED = ("trainer.compile=true", "trainer.compile_backend=aot_eager")


def test_a_compiled_run_trains_as_the_eager_one_and_says_so(compiled_run):
    from test_reliability import LOSSES_BEFORE_RECIPE_OPTIONS

    console = (compiled_run / "console.txt").read_text()
    assert "trainer.compile: the first step took" in console
    records = read_step_records(compiled_run / "metrics.jsonl")
    losses = [records[s]["loss"] for s in sorted(records)]
    assert losses == pytest.approx(LOSSES_BEFORE_RECIPE_OPTIONS, rel=1e-6)


def test_a_compiled_run_killed_mid_epoch_resumes_exactly(tmp_path, compiled_run, omniglot_raw, omniglot_ns_shards):
    from test_reliability import args, killed_at_a_random_step_and_resumed, val_elbos

    run_dir = tmp_path / "run"
    argv = args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false", *COMPILED)
    b = killed_at_a_random_step_and_resumed(argv, run_dir)
    a = read_step_records(compiled_run / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(18))
    assert all(b[s]["loss"] == a[s]["loss"] for s in a)  # to the last digit
    assert val_elbos(run_dir) == val_elbos(compiled_run)


# ------------------------------------------------------------------------------------------------ compile=auto
def test_auto_compiles_a_run_only_after_the_bench_measured_its_configuration_paying(tmp_path, omniglot_raw,
                                                                                   omniglot_ns_shards):
    """The bench's records are what the trainer reads (trainer/compile_choice.py): same key from both sides."""
    import json

    from test_reliability import args

    measured = tmp_path / "measured_compile.json"
    env = {"SCHA_VAE_COMPILE_MEASUREMENTS": str(measured)}
    config = ["trainer.compile_backend=aot_eager", "trainer.max_steps=2", "trainer.epochs=1", "trainer.precision=fp32"]

    def train(name: str) -> str:
        run_dir = tmp_path / name
        proc = run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false",
                                                *config), cwd=ROOT, env=env)
        return proc.stdout + proc.stderr

    console = train("before")  # nothing measured: eager, and the log says how to measure
    assert "trainer.compile=auto: eager: this configuration's compiled and eager steps were not measured" in console
    assert "trainer.compile: the first step took" not in console
    assert "guard read every 1 step(s), compile off (auto), on " in console  # the settings used, said once

    run_module("launch.bench", "experiment=smoke", *config, "trainer.compile=false,true", "device=cpu", "threads=1",
               "warmup=0", "steps=1", "eval=false", cwd=tmp_path, env=env)
    data = json.loads(measured.read_text())
    (entry,) = data["records"].values()  # the eager and the compiled row: one key
    assert entry["eager_step_s"] > 0 and entry["compiled_step_s"] > 0 and entry["compile_s"] >= 0
    assert entry["config"]["backend"] == "aot_eager" and "1 torch threads" in entry["config"]["device"]

    # a tiny model gains nothing from capture; say the bench found it paying, and the run compiles
    entry.update(eager_step_s=1.0, compiled_step_s=0.5, compile_s=0.0)
    measured.write_text(json.dumps(data))
    console = train("after")
    assert "trainer.compile=auto: compiled: measured 1 s a step eager, 0.5 s compiled" in console
    assert "trainer.compile: the first step took" in console and "compile on (auto)" in console
