"""Units of the distributed setup, without launchers: batch planning, the global-batch slicer, the world-size
invariance of BatchNorm statistics and sampling noise (two gloo processes vs one), the post-reduction clamp."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest

from conftest import free_port
import torch
from torch import nn

from trainer.batching import BatchConfigError, GlobalBatchSlices, plan_batches
from data_pipeline.config import DataConfig
from trainer.config import Config, TrainerConfig


def cfg_with(batch_sets=8, global_batch_sets=0, grad_accum=1, **data) -> Config:
    return Config(data=DataConfig(batch_sets=batch_sets, **data),
                  trainer=TrainerConfig(global_batch_sets=global_batch_sets, grad_accum=grad_accum))


def test_batch_plan_derives_global_micro_and_accumulation():
    p = plan_batches(cfg_with(batch_sets=8), 4)  # per-rank micro batch given: the global batch follows W
    assert (p.global_sets, p.micro_sets, p.grad_accum, p.world_size) == (32, 8, 1, 4)
    p = plan_batches(cfg_with(global_batch_sets=48, grad_accum=3), 4)  # global batch given: micro derived
    assert (p.global_sets, p.micro_sets, p.grad_accum) == (48, 4, 3)
    assert plan_batches(cfg_with(global_batch_sets=8), 1).micro_sets == 8


@pytest.mark.parametrize("world, accum", [(3, 1), (2, 3), (16, 1)])
def test_bad_combination_names_the_numbers(world, accum):
    with pytest.raises(BatchConfigError) as err:
        plan_batches(cfg_with(global_batch_sets=8, grad_accum=accum), world)
    msg = str(err.value)
    assert "trainer.global_batch_sets=8" in msg and f"world size {world}" in msg
    assert f"trainer.grad_accum={accum}" in msg and f"(= {world * accum})" in msg


def test_global_batch_slices_partition_the_single_process_batches(omniglot_ns_shards):
    """W ranks x A accumulation steps see exactly one process's global batches, each set once, in order;
    a position inside an accumulation group resumes exactly."""
    data = DataConfig(shards_dir=str(omniglot_ns_shards), download=False, limit_batches=3)
    cfg = replace(cfg_with(global_batch_sets=12, grad_accum=2), data=data)
    one = GlobalBatchSlices(data, "train", plan_batches(replace(cfg, trainer=TrainerConfig(global_batch_sets=12)), 1), 0)
    one.set_epoch(1)
    reference = list(one)  # 3 global batches of 12 sets
    assert len(reference) == len(one) == 3 and reference[0].shape[0] == 12
    plan = plan_batches(cfg, 2)
    ranks = [GlobalBatchSlices(data, "train", plan, r) for r in range(2)]
    for loader in ranks:
        loader.set_epoch(1)
    parts = [list(loader) for loader in ranks]
    assert len(ranks[0]) == 6 and all(len(p) == 6 for p in parts)
    for b, x in enumerate(reference):  # micro step a of global batch b: rank r holds sets (a W + r) m ...
        rebuilt = torch.cat([parts[r][2 * b + a] for a in range(2) for r in range(2)])
        assert torch.equal(rebuilt, x)
    resumed = GlobalBatchSlices(data, "train", plan, 1)
    resumed.load_state_dict({"epoch": 1, "batches_done": 3})  # inside the second accumulation group
    resumed.set_epoch(1)  # keeps the loaded position
    rest = list(resumed)
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, parts[1][3:]))
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 6}


# -- BatchNorm statistics and noise: two gloo processes reproduce one --------------------------------------
class Tiny(nn.Module):
    """Linear + BatchNorm1d, conv + BatchNorm2d, reparameterised draws on both (set-major, leading batch dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn1 = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.conv, self.bn2 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=None)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.lin(x))
        z = h + torch.exp(0.5 * h.tanh()) * torch.randn_like(h)
        i = self.bn2(self.conv(img))
        u = torch.rand_like(i)
        return (z.square().sum(1).mean() + (i * u).mean() * 3.0) / 2


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 6, generator=g) * 3 + 1, torch.randn(8, 1, 5, 5, generator=g) + 2


def _run(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from trainer.distributed import World
    from trainer.invariant import SharedNoise, replace_batchnorm

    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = Tiny()
    if world_size > 1:
        model = replace_batchnorm(model, sync=True)
    SharedNoise(model, World(rank, rank, world_size, torch.device("cpu"), "gloo"), seed=5)
    x, img = _inputs()
    m = x.shape[0] // world_size
    losses = []
    for _ in range(2):  # two steps: the noise stream and the running statistics move on
        model.zero_grad()
        loss = model(x[rank * m:(rank + 1) * m], img[rank * m:(rank + 1) * m])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        if world_size > 1:  # what DeepSpeed does: average the gradients and the (equal-batch) losses
            for g in grads:
                dist.all_reduce(g)
                g /= world_size
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        evaluated = (model.bn2(model.conv(img)), model.bn1(model.lin(x)))  # running statistics in use
    if rank == 0:
        torch.save({"losses": losses, "grads": grads, "buffers": {k: v.clone() for k, v in model.named_buffers()},
                    "eval": evaluated}, out)
    if world_size > 1:
        dist.destroy_process_group()




def test_two_processes_compute_what_one_computes(tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _run(0, 1, 0, str(tmp_path / "one.pt"))
    mp.start_processes(_run, args=(2, free_port(), str(tmp_path / "two.pt")), nprocs=2, start_method="spawn")
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-6)
    assert one["losses"][0] != pytest.approx(one["losses"][1], rel=1e-3)  # fresh noise every step
    for a, b in zip(one["grads"], two["grads"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert one["buffers"].keys() == two["buffers"].keys()
    for k in one["buffers"]:
        torch.testing.assert_close(two["buffers"][k], one["buffers"][k], rtol=1e-5, atol=1e-6)
    for a, b in zip(one["eval"], two["eval"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_shared_noise_stream_is_separate_and_checkpointable():
    from trainer.distributed import World
    from trainer.invariant import SharedNoise

    w = World(0, 0, 1, torch.device("cpu"), "gloo")
    model = nn.Linear(2, 2)
    noise = SharedNoise(model, w, seed=1)
    state = noise.state_dict()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = []
    for _ in range(2):
        noise._enter(model, ())
        out.append(torch.randn_like(torch.empty(4)))
        noise._exit(model, (), None)
    assert torch.equal(torch.get_rng_state(), before)  # the process's own stream is untouched
    noise.load_state_dict(state)
    noise._enter(model, ())
    assert torch.equal(torch.randn_like(torch.empty(4)), out[0])  # restored stream, same draws
    noise._exit(model, (), None)
    model.eval()
    noise._enter(model, ())  # evaluation: not active
    assert not noise._active


def test_gradient_clamp_acts_on_the_gradient_the_optimizer_steps_with():
    from trainer.engine import add_gradient_clamp

    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    add_gradient_clamp(opt, 0.5)
    p.grad = torch.tensor([-3.0, -0.2, 0.3, 7.0])  # e.g. the all-reduced mean of the ranks' gradients
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, 0.2, -0.3, -0.5]))
