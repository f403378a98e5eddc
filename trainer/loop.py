"""The training loop: DeepSpeed engine, alpha schedule, plateau LR, per-epoch evaluation, checkpoints, tracking."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from data_pipeline.errors import StoreUnavailable
from data_pipeline.prepare import ensure_prepared
from data_pipeline.locations import dataset_location
from models.registry import build_model, count_parameters
from trainer import compile_choice, distributed, schedules, threads
from trainer.batching import make_loader, plan_batches
from trainer.checkpoint import INTERRUPTED, Checkpointer, consolidated_state_dict
from trainer.config import Config, flat_params, to_yaml
from trainer.ema import WeightAverage
from trainer.engine import build_engine
from trainer.evaluation.elbo import evaluate_elbo
from trainer.evaluation.training_figures import fixed_validation_sets, learning_curve, progress_figure
from trainer.fastpath import FastPath, autocast_context, device_name, resolve
from trainer.guard import FaultInjector, NonFiniteGuard, NonFiniteLoss
from trainer.metrics import StepMetrics, append_jsonl, cut_records_from, repair_jsonl, write_text
from trainer.step import TrainingStep
from trainer.registry.mlflow_model import checkpoint_card, example_set
from trainer.registry import system_metrics
from trainer.registry.store import tracking_uri
from trainer.registry.system_metrics import SystemMetrics
from trainer.registry.tracking import Tracker
from trainer.run.errors import CheckpointsUnusable
from trainer.run.summary import Registration, RunSummary

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    epoch: int = 0
    batches_done: int = 0  # within `epoch`
    step: int = 0
    alpha: float = 0.0
    best_vlb: float = -math.inf
    best_checkpoint_vlb: float = -math.inf  # best validation ELBO among checkpointed (registered) epochs
    best_epoch: int = 0  # the epoch (counted from 1) of best_vlb
    skipped: int = 0  # updates skipped by the non-finite guard, in total
    elapsed_s: float = 0.0  # wall clock of the finished epochs (trainer.budget_minutes)
    longest_epoch_s: float = 0.0


@dataclass
class FitResult:
    state: LoopState
    val: Dict[str, float]
    model_version: Optional[str]
    finished: bool  # False when stopped early by trainer.max_steps or preempted
    preempted: bool = False  # stopped by SIGTERM after writing a checkpoint


class Trainer:
    def __init__(self, cfg: Config, world: distributed.World) -> None:
        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.run_dir)
        self.main = world.rank == 0
        threads.apply(cfg.trainer.threads, world.device.type, announce=self.main)
        torch.manual_seed(cfg.trainer.seed + world.rank)
        if world.local_rank == 0:
            ensure_prepared(cfg.data, progress=cfg.trainer.progress and self.main)
        distributed.barrier()
        self.loaders = {
            split: make_loader(cfg, split, world.rank, world.world_size)  # trainer/batching.py
            for split in (("train", "val", "test") if cfg.trainer.eval_test else ("train", "val"))
        }
        model = build_model(cfg.model)
        self.n_params = count_parameters(model)
        t = cfg.trainer
        # hook order matters: injected faults first, then the guard, then the engine's clamp (raw gradients seen)
        self.faults = FaultInjector(model, t.fault_nan_loss_steps, t.fault_nan_grad_steps, world.rank, t.fault_rank,
                                    t.fault_exit_step)
        plan = plan_batches(cfg, world.world_size)
        # optimizer steps per epoch (DeepSpeed steps the optimizer at accumulation boundaries)
        self.steps_per_epoch = max(1, len(self.loaders["train"]) // plan.grad_accum)
        self.fast = self._fast_path(plan)  # trainer/fastpath.py: precision, channels_last, guard, compile
        if self.main:
            self._say_fast_path()
        self.guard = NonFiniteGuard(model, t.max_consecutive_skips, self.fast.guard_every, world.device)
        self.engine, self.optimizer = build_engine(model, cfg, world, self.fast)
        self.train_step = TrainingStep(self.engine, self.optimizer, self.guard, self.faults,
                                       cfg.trainer.kl_z_weight)
        self.compile_reported = False
        self.dtype = self.fast.input_dtype
        self.scheduler = schedules.build_lr_scheduler(self.optimizer, t, t.epochs * self.steps_per_epoch)
        self.lr_per_step = schedules.per_step(self.scheduler)
        self.ema = WeightAverage(self.engine.module, t.ema_decay) if t.ema_decay else None
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints", cfg.trainer.keep_checkpoints)
        self.tracker = Tracker(cfg.tracking, self.run_dir, enabled=self.main)
        # on a multi-node job the first process of every other node samples its node's system metrics into the
        # run rank 0 opened; they learn its id at the end of an epoch (rank 0's tracker opens it asynchronously)
        self.node_system = SystemMetrics(cfg.tracking)
        self.node_monitor_pending = system_metrics.wanted(cfg.tracking) and system_metrics.multi_node()
        self.metrics = StepMetrics(self.run_dir / "metrics.jsonl", enabled=self.main)
        self.state = LoopState(alpha=cfg.trainer.alpha)
        self.model_version = None  # future of the last registered version
        self.registrations: List[Registration] = []  # this start's, for the end-of-run summary
        every = cfg.trainer.sample_every_epochs
        self.figure_sets = fixed_validation_sets(cfg.data).to(world.device, self.dtype) if every else None

    # -- state --------------------------------------------------------------------------------------
    def _client_state(self) -> dict:
        return {"loop": asdict(self.state), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def _averaged(self):
        """The weights validation, figures and samples use: the moving average when trainer.ema_decay is on."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _resume(self) -> None:
        """Resume from the newest usable checkpoint (whatever `latest` says); one that is damaged, of another
        model, or fails to load on any rank is skipped for the next older one. Starting over while finished
        checkpoints exist of which none is usable would silently discard the run: refused, naming each one and
        why (an interrupted save, which never finished, does not count)."""
        if self.cfg.trainer.resume != "auto":
            return
        intact, notes = self.checkpoints.resume_candidates()
        for note in notes if self.main else ():
            log.warning(note)
        unusable = {tag: why for tag in self.checkpoints.tags()
                    if (why := self.checkpoints.damage(tag)) not in (None, INTERRUPTED)}
        for tag in intact:
            wrong_model = self.checkpoints.mismatch(self.engine, tag)  # from meta.json, before any tensor
            if wrong_model:
                client, error = None, CheckpointsUnusable(wrong_model)
            else:
                try:
                    client, error = self.checkpoints.load(self.engine, tag), None
                except Exception as exc:  # a damaged file that kept its size: try the next one
                    client, error = None, exc
            if distributed.any_rank(error is not None):
                if error is None:
                    why = "it could not be loaded on another rank"
                elif isinstance(error, CheckpointsUnusable):
                    why = str(error)
                else:
                    first = (str(error).splitlines() or [""])[0][:200]
                    why = f"it could not be loaded ({type(error).__name__}: {first})"
                unusable[tag] = why
                if self.main:
                    log.warning("skipping checkpoint %s: %s", self.checkpoints.dir / tag, why)
                continue
            self.state = LoopState(**client["loop"])
            self.scheduler.load_state_dict(client["scheduler"])
            if self.ema is not None:
                if client.get("ema"):
                    self.ema.load_state_dict(client["ema"])
                elif self.main:
                    log.warning("checkpoint %s holds no averaged weights (written with trainer.ema_decay=0): the "
                                "average starts from the resumed weights", tag)
            if self.main:
                log.info("resumed from %s (epoch %d, step %d)", self.checkpoints.dir / tag, self.state.epoch,
                         self.state.step)
            return
        if unusable:
            listed = "; ".join(f"{tag}: {why}" for tag, why in sorted(unusable.items()))
            raise CheckpointsUnusable(f"no checkpoint under {self.checkpoints.dir} can be resumed from ({listed}); "
                                      "set trainer.resume=never to start the run over")

    def _save(self) -> str:
        return self.checkpoints.save(self.engine, self.state.step, self._client_state())

    # -- loop ---------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.run_dir / "config.yaml"
        if self.main:
            write_text(config_file, to_yaml(cfg))
            for records in ("metrics.jsonl", "epochs.jsonl"):
                cut = repair_jsonl(self.run_dir / records)
                if cut:
                    log.warning("%s ended in a torn record (%d bytes, an interrupted write): cut away",
                                self.run_dir / records, cut)
        self._resume()
        if self.main:  # the steps and epochs after the checkpoint are about to run again: one record each
            cut = (cut_records_from(self.run_dir / "metrics.jsonl", self.state.step, inclusive=True)
                   + cut_records_from(self.run_dir / "epochs.jsonl", self.state.step, inclusive=False))
            if cut:
                log.info("%d record(s) after step %d cut from metrics.jsonl / epochs.jsonl: they run again",
                         cut, self.state.step)
        self.guard.install_signal_handlers()
        self.tracker.start(cfg.name, {**flat_params(cfg), "n_params": self.n_params}, config_file,
                           dataset_dir=dataset_location(cfg.data), monitor_system=True)
        val: Dict[str, float] = {}
        self.clock = time.perf_counter()
        status = "FAILED"
        try:
            while self.state.epoch < cfg.trainer.epochs and not self._budget_spent():
                if not self._train_epoch():
                    status = "KILLED" if self.guard.stop_requested else "FINISHED"
                    return FitResult(self.state, val, None, finished=False, preempted=self.guard.stop_requested)
                val = self._end_epoch()
            status = "FINISHED"
        finally:
            if self.main:
                self._learning_curve()
            self.node_system.stop()
            self.tracker.end(status, preempted=self.guard.stop_requested)
            if self.main:
                for line in self.summary().lines():
                    log.info(line)
        version = self.model_version.result() if self.model_version and self.model_version.done() else None
        return FitResult(self.state, val, version, finished=True)

    def summary(self) -> RunSummary:
        t = self.cfg.tracking
        why = ("" if self.tracker.registering else "tracking.enabled=false" if not t.enabled
               else "tracking.register=false")
        return RunSummary(self.run_dir, self.state.epoch, self.cfg.trainer.epochs, self.state.best_vlb,
                          self.state.best_epoch, t.model_name or self.cfg.name, why, self.registrations,
                          self.tracker.link)

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when trainer.max_steps or SIGTERM stopped it (after a
        checkpoint). A step whose loss or gradients are not finite on any rank is skipped on every rank."""
        cfg, st = self.cfg, self.state
        loader = self.loaders["train"]
        loader.set_epoch(st.epoch)
        loader.load_state_dict({"epoch": st.epoch, "batches_done": st.batches_done})
        self.engine.train()
        bar = tqdm(total=len(loader), initial=st.batches_done, desc=f"epoch {st.epoch + 1}/{cfg.trainer.epochs}",
                   disable=not (self.main and cfg.trainer.progress), dynamic_ncols=True)
        try:
            return self._train_batches(loader, bar)
        except StoreUnavailable:
            # one process: nothing lost, the next start resumes at this very batch. With several ranks the
            # others are inside a collective this rank will not join, so a collective save would hang; the run
            # resumes from its last checkpoint
            if self.world.world_size == 1:
                self._flush(bar)
                log.warning("the data store is unreachable: checkpoint %s written at step %d, exiting",
                            self._save(), st.step)
            bar.close()
            raise

    def _fast_path(self, plan) -> FastPath:
        """The resolved speed settings; `trainer.compile=auto` decided by rank 0 from this machine's measurements
        for the whole run's planned steps (trainer/compile_choice.py) and shared, so every rank runs alike."""
        t, device = self.cfg.trainer, self.world.device
        fast = resolve(t, device.type)
        if t.compile != "auto":
            return fast
        choice = None
        if self.main:
            fingerprint = compile_choice.step_fingerprint(self.cfg, plan.micro_sets, plan.grad_accum,
                                                          self.world.world_size, fast.precision, fast.channels_last,
                                                          device_name(device))
            planned = t.epochs * self.steps_per_epoch
            planned = min(planned, t.max_steps) if t.max_steps else planned
            choice = compile_choice.decide(fingerprint, planned, t.budget_minutes * 60.0)
            log.info("trainer.compile=auto: %s", choice.reason)
        on = distributed.broadcast_text("on" if choice and choice.on else "off") == "on"
        return resolve(t, device.type, compile_auto=on)

    def _say_fast_path(self) -> None:
        t, f = self.cfg.trainer, self.fast
        log.info("speed settings (trainer/fastpath.py): precision %s (trainer.precision=%s), channels_last %s (%s), "
                 "guard read every %d step(s), compile %s (%s), on %s", f.precision, t.precision,
                 "on" if f.channels_last else "off", t.channels_last, f.guard_every, "on" if f.compile else "off",
                 t.compile, device_name(self.world.device))

    def _train_batches(self, loader, bar: tqdm) -> bool:
        cfg, st = self.cfg, self.state
        for x in loader:
            x = x.to(self.world.device, self.dtype, non_blocking=True)
            last = st.batches_done + 1 == len(loader) or 0 < cfg.trainer.max_steps <= st.step + 1
            if cfg.trainer.alpha_schedule == "step":
                st.alpha = schedules.alpha_at(cfg.trainer.alpha, cfg.trainer.alpha_step, st.step, len(loader))
            updates = self.engine.global_steps
            started = time.perf_counter()
            out = self.train_step(x, st.alpha, st.step, check=last)  # the guard reads its flags at an epoch's end
            if self.fast.compile and not self.compile_reported:
                self.compile_reported = True
                log.info("trainer.compile: the first step took %.1f s (capture and code generation of the forward "
                         "and backward included; cache %s)", time.perf_counter() - started,
                         os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            stepped = self.engine.global_steps != updates  # the optimizer stepped (a boundary, not skipped)
            if stepped and self.ema is not None:
                self.ema.update()
            st.skipped += out.skipped
            self.metrics.add(st.step, out.row, x.shape[0] * x.shape[1])
            st.step += 1
            st.batches_done += 1
            bar.update(1)
            stop = out.preempted or (cfg.trainer.max_steps and st.step >= cfg.trainer.max_steps)
            if st.step % cfg.trainer.log_every == 0 or stop or st.batches_done == len(loader) or out.skipped:
                self._flush(bar)  # records the learning rate this step used
            if stepped and self.lr_per_step:
                self.scheduler.step()
            if out.checked and self.guard.consecutive >= self.guard.max_consecutive:
                bar.close()
                raise NonFiniteLoss(self.guard.stop_message(
                    st.step - 1, self.checkpoints.dir / (self.checkpoints.latest_tag() or "<none yet>")))
            if stop:
                bar.close()
                self._save()
                return False
        bar.close()
        return True

    def _flush(self, bar: tqdm) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        records = self.metrics.flush({"epoch": self.state.epoch, "lr": lr, "alpha": self.state.alpha})
        if records and self.main:
            last = records[-1]
            bar.set_postfix(loss=f"{last['loss']:.2f}", elbo=f"{last['vlb']:.2f}", img_s=f"{last['img_per_s']:.0f}")
            self.tracker.log_steps(records)

    def _watch_this_node(self) -> None:
        run_id = distributed.broadcast_text(self.tracker.run_id or "")
        if run_id:
            self.node_monitor_pending = False
            if not self.main and self.world.local_rank == 0:
                self.node_system.start(run_id, tracking_uri(self.cfg.tracking), resumed=True)

    def _budget_spent(self) -> bool:
        """trainer.budget_minutes: would one more epoch, as long as the longest so far, pass the budget?"""
        budget, st = self.cfg.trainer.budget_minutes * 60.0, self.state
        return budget > 0 and st.epoch > 0 and st.elapsed_s + st.longest_epoch_s > budget

    def _end_epoch(self) -> Dict[str, float]:
        cfg, st = self.cfg, self.state
        if cfg.trainer.alpha_schedule == "step":
            st.alpha = schedules.alpha_at(cfg.trainer.alpha, cfg.trainer.alpha_step, st.step,
                                          len(self.loaders["train"]))
        else:
            st.alpha *= cfg.trainer.alpha_step
        with self._averaged(), autocast_context(self.fast, self.world.device.type):
            results = {split: evaluate_elbo(self.engine.module, self.loaders[split], self.world.device, self.dtype)
                       for split in self.loaders if split != "train"}
        val = results["val"]
        if not self.lr_per_step:
            self.scheduler.step(val["vlb"])
        st.epoch += 1
        # wall clock since the previous epoch's validation (its figure and checkpoint included); an epoch resumed
        # after a stop counts from the resume
        now = time.perf_counter()
        took, self.clock = now - self.clock, now
        st.elapsed_s += took
        st.longest_epoch_s = max(st.longest_epoch_s, took)
        if val["vlb"] > st.best_vlb:
            st.best_vlb, st.best_epoch = val["vlb"], st.epoch
        st.batches_done = 0
        epoch_metrics = {f"{split}/{k}": v for split, r in results.items() for k, v in r.items()}
        epoch_metrics.update(alpha=st.alpha, best_val_vlb=st.best_vlb, skipped_total=st.skipped,
                             elapsed_min=st.elapsed_s / 60)
        self.tracker.log_metrics(epoch_metrics, step=st.step)
        if self.node_monitor_pending:
            self._watch_this_node()
        if self.main:
            log.info("epoch %d/%d: validation ELBO %.3f nats/image (best %.3f, epoch %d)", st.epoch,
                     cfg.trainer.epochs, val["vlb"], st.best_vlb, st.best_epoch)
            append_jsonl(self.run_dir / "epochs.jsonl", [{"epoch": st.epoch, "step": st.step, **epoch_metrics}])
        if self.figure_sets is not None and st.epoch % cfg.trainer.sample_every_epochs == 0:
            self._progress_figure()
        out_of_budget = self._budget_spent()
        if out_of_budget and self.main:
            log.info("trainer.budget_minutes=%g: %d epochs took %.1f min; one more (up to %.1f min) would pass the "
                     "budget: the run ends here", cfg.trainer.budget_minutes, st.epoch, st.elapsed_s / 60,
                     st.longest_epoch_s / 60)
        if (st.epoch % cfg.trainer.checkpoint_every_epochs == 0 or st.epoch == cfg.trainer.epochs
                or out_of_budget):
            # champion: the best of the versions registered, not of every epoch (some are never checkpointed)
            improved = val["vlb"] > st.best_checkpoint_vlb
            st.best_checkpoint_vlb = max(st.best_checkpoint_vlb, val["vlb"])
            tag = self._save()
            self._register(tag, improved, last=st.epoch == cfg.trainer.epochs or out_of_budget,
                           metrics={k: v for k, v in epoch_metrics.items() if k.startswith(("val/", "test/"))})
        return val

    def _progress_figure(self) -> None:
        """Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 writes the picture."""
        with self._averaged(), autocast_context(self.fast, self.world.device.type):
            fig = progress_figure(self.engine.module, self.figure_sets, self.state.epoch, self.cfg.trainer.epochs)
        if self.main:
            path = self._write_figure(fig, f"samples_epoch{self.state.epoch:03d}.png")
            self.tracker.log_artifact(path, "figures")

    def _learning_curve(self) -> None:
        try:
            path = self._write_figure(learning_curve(self.run_dir), "learning_curve.png")
        except (OSError, ValueError) as exc:  # a picture must never fail the run
            log.warning("no learning curve: %s", exc)
            return
        self.tracker.log_artifact(path, "figures")
        log_file = self.run_dir / "train.log"  # Hydra's log of this run (launch.train)
        if log_file.is_file():
            self.tracker.log_artifact(log_file)

    def _write_figure(self, fig, name: str) -> Path:
        path = self.run_dir / "figures" / name
        path.parent.mkdir(exist_ok=True)
        fig.savefig(path, dpi=100)
        return path

    def _register(self, tag: str, improved: bool, last: bool, metrics: Dict[str, float]) -> None:
        """Log the checkpoint's weights as a model version; the best validation ELBO so far gets alias
        `champion`, the final one `last` (MLflow reserves `latest`: `models:/<name>/latest` resolves to the
        newest version, which is the final one too). The weights are read back from the checkpoint just
        written (fp32 master weights at any ZeRO stage); nothing of the training state is touched."""
        if not self.tracker.registering:
            return
        aliases = (("champion",) if improved else ()) + (("last",) if last else ())
        name = self.cfg.tracking.model_name or self.cfg.name
        card = checkpoint_card(self.cfg, self.n_params, tag, self.state.step, self.state.epoch, metrics,
                               self.tracker.run_id or "")
        state = consolidated_state_dict(self.checkpoints.dir, tag)
        future = self.tracker.register_model(state, card, name, aliases, tag, example_set(self.cfg.data, card))
        self.model_version = future or self.model_version
        self.registrations.append(Registration(tag, aliases, future))
