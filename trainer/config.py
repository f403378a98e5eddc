"""The typed, validated run configuration: Hydra composes YAML onto this schema.

Unknown keys fail at composition (struct mode names the key); bad values fail in `__post_init__`
with the dotted key in the message. `load_config` is the single way entry points get a `Config`.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from omegaconf import DictConfig, OmegaConf

from data_pipeline.config import DataConfig
from models.config import ModelConfig
from trainer.run.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "amp_bf16")
SWITCHES = ("auto", "true", "false")
RESUME = ("auto", "never")
DATA_PARALLEL = ("invariant", "sharded")
OFFLOAD = ("none", "cpu")


@dataclass
class TrainerConfig:
    """Optimisation and loop settings (SPEC 6 defaults: Adam, wd 1e-5, plateau on val ELBO, alpha schedule)."""

    epochs: int = 1000
    max_steps: int = 0  # >0: stop (and checkpoint) after this many optimizer steps in total
    # >0: a wall-clock budget in minutes (training, validation and checkpoints, in whole epochs): the run ends,
    # validated, checkpointed and registered like its last epoch, before an epoch as long as its longest so far
    # would pass the budget (docs/results.md compares models at equal budgets)
    budget_minutes: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-5
    alpha: float = 2.0  # training loss weight w = 1 + alpha (SPEC 3.11)
    alpha_step: float = 0.98  # alpha <- alpha * alpha_step after every epoch
    # auto: amp_bf16 where bf16 is fast (CUDA >= sm80, CPUs with AMX/AVX512-BF16), else fp32; amp_bf16: DeepSpeed's
    # torch_autocast (fp32 weights, bf16 compute); bf16: DeepSpeed's bf16 (bf16 weights). trainer/fastpath.py
    precision: str = "auto"
    channels_last: str = "auto"  # NHWC convolutions; auto: at ZeRO stage 0 (ZeRO 1-3 flatten the weights)
    # the non-finite guard's host check every N steps (N > 1: found on the device, no per-step sync); 0: auto
    # (1 on a CPU, 20 on a GPU). trainer/guard.py
    guard_every: int = 0
    # torch.compile the training forward and backward (trainer/compiled.py); ZeRO stage <= 2. auto: where this
    # machine's bench measured the configuration faster compiled and the run repays the compile (compile_choice.py)
    compile: str = "auto"
    compile_backend: str = "inductor"  # or aot_eager: the same capture without generated code (debugging)
    zero_stage: int = 0
    # "cpu": DeepSpeed keeps the optimizer state (fp32 master weights, Adam moments) in host memory and runs the
    # optimizer step there (ZeRO-Offload); needs zero_stage >= 1 (docs/scaling.md)
    offload_optimizer: str = "none"
    grad_accum: int = 1
    # Sets per optimizer step over all ranks and accumulation steps. 0: data.batch_sets x grad_accum x world
    # size (data.batch_sets is the per-rank micro batch). >0: fixed whatever the world size; the per-rank micro
    # batch is derived (global / (world size x grad_accum), which must divide) and data.batch_sets only sizes
    # the evaluation batches. See trainer/batching.py.
    global_batch_sets: int = 0
    # "invariant": training does not depend on the world size -- every rank forms the same global batch and
    # keeps its slice, BatchNorm statistics are synchronised over ranks and the sampling noise of the global
    # batch is drawn once (each rank keeps its slice), so N processes reproduce 1 process and checkpoints resume
    # at any world size with the same losses. "sharded": plain data parallelism -- each rank samples its own
    # classes, local BatchNorm statistics, independent noise (least work per rank). Same at world size 1.
    data_parallel: str = "invariant"
    grad_clip_norm: float = 0.0  # global-norm clipping; 0 disables (DeepSpeed's silent 1.0 default is overridden)
    grad_clamp: float = 1.0  # reference's element-wise clamp to [-v, v]; 0 disables
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_lr: float = 0.0
    # Recipe options beyond the reference, each off by default (docs/results.md measures each on the demo):
    # plateau = the reference's ReduceLROnPlateau on validation ELBO; cosine / linear: decay to min_lr at the run's
    # last step; constant. warmup_steps: linear warm-up over that many optimizer steps (per-step schedules only).
    # trainer/schedules.py
    lr_schedule: str = "plateau"
    warmup_steps: int = 0
    # weight of the per-image KL in the training loss (models/objective.py); 1: the reference's. Above 1 an image's
    # own latents cost more than the set's shared context, which is what conditional samples are drawn from.
    kl_z_weight: float = 1.0
    alpha_schedule: str = "epoch"  # epoch: alpha *= alpha_step after every epoch (reference); step: spread per step
    # >0: an exponential moving average of the weights with this decay (e.g. 0.999); validation, figures, the
    # registered and exported weights are the averaged ones, and checkpoints carry them. trainer/ema.py
    ema_decay: float = 0.0
    # intra-op threads of each process: auto = OMP_NUM_THREADS when set, else the usable cores / processes on the
    # node; or a number. trainer/threads.py
    threads: str = "auto"
    seed: int = 0
    resume: str = "auto"
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    log_every: int = 20  # steps between metric flushes (the only host syncs of the loop)
    sample_every_epochs: int = 1  # a picture of reconstructions and samples of fixed validation sets (0: never)
    eval_test: bool = True  # evaluate the test split every epoch, like the reference
    progress: bool = True
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops with an error
    # every collective (all-reduce, barrier) fails after this long instead of hanging: a stalled or lost rank
    # ends the job with exit code 6 naming the unresponsive ranks. Longer than the slowest legitimate gap
    # between collectives (an epoch-end evaluation, a checkpoint write, the first step's compilation)
    collective_timeout_s: float = 600.0
    # fault injection for tests and drills: NaN loss / NaN gradient at these steps, on fault_rank (-1: all)
    fault_nan_loss_steps: List[int] = field(default_factory=list)
    fault_nan_grad_steps: List[int] = field(default_factory=list)
    fault_rank: int = -1
    fault_exit_step: int = -1  # the process dies at this step (first attempt of an elastic job only)

    def __post_init__(self) -> None:
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"trainer.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"trainer.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.channels_last, self.compile = str(self.channels_last).lower(), str(self.compile).lower()
        for key in ("channels_last", "compile"):
            if getattr(self, key) not in SWITCHES:
                raise ConfigError(f"trainer.{key} must be one of {SWITCHES}, got {getattr(self, key)!r}")
        if self.channels_last == "true" and (self.zero_stage > 0 or self.precision == "bf16"):
            raise ConfigError("trainer.channels_last=true needs trainer.zero_stage=0 and a precision other than bf16: "
                             "ZeRO stages 1-3 and DeepSpeed's bf16 optimizer keep the weights in flat contiguous "
                             "buffers, which cannot hold channels-last strides")
        if self.compile == "true" and self.zero_stage == 3:
            raise ConfigError("trainer.compile=true needs trainer.zero_stage <= 2: ZeRO-3 gathers weights in module "
                             "hooks, which graph capture cannot see")
        if self.compile_backend not in ("inductor", "aot_eager"):
            raise ConfigError(f"trainer.compile_backend must be inductor or aot_eager, got {self.compile_backend!r}")
        if self.guard_every < 0:
            raise ConfigError(f"trainer.guard_every must be >= 0 (0: auto), got {self.guard_every}")
        if self.resume not in RESUME:
            raise ConfigError(f"trainer.resume must be one of {RESUME}, got {self.resume!r}")
        if self.data_parallel not in DATA_PARALLEL:
            raise ConfigError(f"trainer.data_parallel must be one of {DATA_PARALLEL}, got {self.data_parallel!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer not in OFFLOAD:
            raise ConfigError(f"trainer.offload_optimizer must be one of {OFFLOAD}, got {self.offload_optimizer!r}")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError(
                f"trainer.offload_optimizer={self.offload_optimizer} needs trainer.zero_stage >= 1: DeepSpeed offloads "
                "the state of its ZeRO optimizer (stages 1-3) only; there is no optimizer offload without ZeRO")
        for key in ("lr", "grad_accum", "epochs", "log_every", "checkpoint_every_epochs", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"trainer.{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "alpha", "grad_clip_norm", "grad_clamp", "min_lr", "max_steps", "budget_minutes",
                    "global_batch_sets", "sample_every_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if not self.kl_z_weight > 0:
            raise ConfigError(f"trainer.kl_z_weight must be > 0 (1: the reference's loss), got {self.kl_z_weight}")
        if not 0 < self.alpha_step <= 1:
            raise ConfigError(f"trainer.alpha_step must be in (0, 1], got {self.alpha_step}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"trainer.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        self._check_recipe()

    def _check_recipe(self) -> None:
        from trainer import schedules, threads

        if self.lr_schedule not in schedules.LR_SCHEDULES:
            raise ConfigError(f"trainer.lr_schedule must be one of {schedules.LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.alpha_schedule not in schedules.ALPHA_SCHEDULES:
            raise ConfigError(f"trainer.alpha_schedule must be one of {schedules.ALPHA_SCHEDULES}, "
                              f"got {self.alpha_schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"trainer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.lr_schedule == "plateau":
            raise ConfigError("trainer.warmup_steps needs a per-step trainer.lr_schedule (cosine, linear or constant); "
                              "plateau changes the learning rate only at epoch ends")
        if self.lr_schedule != "plateau" and self.min_lr > self.lr:
            raise ConfigError(f"trainer.min_lr={self.min_lr} is above trainer.lr={self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.ema_decay and self.zero_stage == 3:
            raise ConfigError("trainer.ema_decay needs trainer.zero_stage <= 2: ZeRO-3 partitions the weights over "
                              "ranks, and the average is kept of whole weights")
        try:
            self.threads = threads.check_setting(self.threads)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only). An empty uri means the embedded sqlite store under `root`."""

    enabled: bool = True
    uri: str = ""
    root: str = "mlruns"
    experiment: str = "scha-vae"
    register: bool = True
    model_name: str = ""  # registry name; empty -> derived from the run name
    retry_s: float = 2.0  # first retry delay while the tracking server is unreachable (doubles up to 30 s)
    flush_timeout_s: float = 120.0  # at the end, wait this long for buffered calls before the fallback file
    # on SIGTERM (a grace period of 30 s is common): wait at most this long, and not at all while the store is
    # unreachable, before writing what is still queued to the fallback file
    preempt_flush_s: float = 5.0
    # evaluation / generation: how long an unreachable store is retried before the job exits 8 (transient)
    outage_timeout_s: float = 120.0
    # MLflow's system metrics (CPU, memory, disk, network, GPU) sampled every interval on each node of a run
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.system_metrics_interval_s > 0:
            raise ConfigError(f"tracking.system_metrics_interval_s must be > 0, got {self.system_metrics_interval_s}")
        if self.model_name and not all(c.isalnum() or c in "-_." for c in self.model_name):
            raise ConfigError(f"tracking.model_name may hold letters, digits, '-', '_' and '.', got {self.model_name!r}")


EVAL_JOBS = ("elbo", "marginal", "cardinality", "kl_layer", "transfer", "fewshot", "samples", "attention",
             "sample_quality")


# The eval.* keys each job reads (besides eval.job and eval.seed, which every job reads): what its MLflow run logs
# as parameters, so a run page shows the job's settings and not the other jobs' defaults (docs/evaluation.md).
_OMNIGLOT_PASSES = ("split", "set_sizes", "batch_sets", "max_batches", "allow_other_dataset")
_IMPORTANCE = ("importance_samples", "chunk", "max_images_per_pass")
EVAL_JOB_KEYS: Dict[str, Tuple[str, ...]] = {
    "elbo": _OMNIGLOT_PASSES,
    "marginal": _OMNIGLOT_PASSES + _IMPORTANCE + ("k_values",),
    "cardinality": ("splits", "set_sizes", "batch_sets", "max_batches", "allow_other_dataset"),
    "kl_layer": _OMNIGLOT_PASSES,
    "transfer": ("set_sizes", "batch_sets", "max_batches", "transfer_datasets", "mnist_dir") + _IMPORTANCE,
    "fewshot": ("shots", "episodes", "queries", "rules", "mnist_dir"),
    "samples": ("split", "set_sizes", "num_sets", "refine_iterations", "sources", "mnist_dir", "allow_other_dataset"),
    "attention": ("split", "set_sizes", "num_sets", "allow_other_dataset"),
    "sample_quality": _OMNIGLOT_PASSES + ("episodes", "ways", "samples_per_set", "refine_iterations",
                                          "feature_model"),
}


@dataclass
class EvalConfig:
    """An evaluation job on a registered model (`python -m launch.evaluate eval=<job> model_uri=...`).

    docs/evaluation.md describes every job and which keys it reads.
    """

    job: str = "elbo"
    split: str = "test"  # elbo / marginal / kl_layer / attention: the Omniglot split evaluated
    splits: List[str] = field(default_factory=lambda: ["train", "test"])  # cardinality: the splits compared
    set_sizes: List[int] = field(default_factory=lambda: [5])
    batch_sets: int = 0  # >0: sets per evaluation batch (default: data.batch_sets)
    importance_samples: int = 1000  # K of the IWAE bound (marginal, transfer)
    k_values: List[int] = field(default_factory=list)  # marginal: smaller K too (each divides the next; >= K ignored)
    chunk: int = 100  # importance samples per forward pass (at most; see max_images_per_pass)
    max_images_per_pass: int = 4096  # caps chunk x sets x set size per forward pass (memory)
    max_batches: int = 0  # >0 caps the batches per set size and dataset (quick looks)
    seed: int = 0  # latent draws, MNIST set order and binarisation, few-shot supports
    mnist_dir: str = "data/raw/mnist"  # MNIST IDX files (transfer, fewshot, samples)
    transfer_datasets: List[str] = field(default_factory=lambda: ["mnist", "doublemnist", "triplemnist"])
    shots: int = 5  # fewshot: images per digit in a support set (10-way)
    episodes: int = 5  # fewshot: independent draws of the 10 support sets; queries are split among them
    queries: int = 0  # fewshot: >0 caps the MNIST test queries (0: all 10,000)
    rules: List[str] = field(default_factory=lambda: ["kl", "elbo_gain"])  # fewshot decision rules
    num_sets: int = 10  # samples / attention: sets shown
    refine_iterations: int = 10  # samples: iterations of the refined sampler (every iterate is shown)
    sources: List[str] = field(default_factory=lambda: ["omniglot", "mnist"])  # samples: where input sets come from
    # Omniglot jobs refuse a dataset other than the one the model was trained on (the splits differ)
    allow_other_dataset: bool = False
    # sample_quality: the feature net (`python -m launch.train_features`), C of the C-way prototype classifier,
    # N images per set and row (episodes: one test class each)
    feature_model: str = "models:/protonet@champion"
    ways: int = 20
    samples_per_set: int = 10

    def __post_init__(self) -> None:
        if self.job not in EVAL_JOBS:
            raise ConfigError(f"eval.job must be one of {EVAL_JOBS}, got {self.job!r}")
        split_names = ("train", "val", "test")
        if self.split not in split_names:
            raise ConfigError(f"eval.split must be train, val or test, got {self.split!r}")
        if not self.splits or any(s not in split_names for s in self.splits):
            raise ConfigError(f"eval.splits must be a non-empty list of train/val/test, got {self.splits}")
        if not self.set_sizes or min(self.set_sizes) < 1:
            raise ConfigError(f"eval.set_sizes must be a non-empty list of sizes >= 1, got {self.set_sizes}")
        for key in ("importance_samples", "chunk", "shots", "episodes", "num_sets", "samples_per_set"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_batches", "batch_sets", "queries", "refine_iterations"):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        if self.ways < 2 or self.samples_per_set < 2:
            raise ConfigError(f"eval.ways and eval.samples_per_set must be >= 2 (a C-way classifier; pairwise "
                              f"distances), got {self.ways}, {self.samples_per_set}")
        ks = sorted({k for k in self.k_values if k < self.importance_samples} | {self.importance_samples})
        if min(ks) < 1 or any(b % a for a, b in zip(ks, ks[1:])):
            raise ConfigError(
                f"eval.k_values must be >= 1 and, sorted with eval.importance_samples={self.importance_samples} "
                f"(larger values are ignored), each must divide the next (e.g. [1, 10, 100] with 1000), got "
                f"{self.k_values}; eval.k_values=[] reports K only"
            )
        transfer = ("mnist", "doublemnist", "triplemnist")
        if not self.transfer_datasets or any(d not in transfer for d in self.transfer_datasets):
            raise ConfigError(f"eval.transfer_datasets must be a non-empty list of {transfer}, got {self.transfer_datasets}")
        if not self.rules or any(r not in ("kl", "elbo_gain") for r in self.rules):
            raise ConfigError(f"eval.rules must be a non-empty list of kl / elbo_gain, got {self.rules}")
        if not self.sources or any(s not in ("omniglot", "mnist") for s in self.sources):
            raise ConfigError(f"eval.sources must be a non-empty list of omniglot / mnist, got {self.sources}")


@dataclass
class Config:
    name: str = "run"  # run name: names the run directory, the MLflow run and the registered model
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model_uri: str = ""  # evaluation jobs: models:/<name>@<alias> (or any MLflow model URI)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")
        if self.model.image_channels != self.data.image_channels or self.model.image_size != self.data.image_size:
            raise ConfigError(
                f"model image shape ({self.model.image_channels}, {self.model.image_size}) does not match "
                f"data ({self.data.image_channels}, {self.data.image_size}): set model.image_* or data.image_*"
            )


def register_schema() -> None:
    """Make the schema available to Hydra as `base_config` (config.yaml lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def load_config(cfg: DictConfig) -> Config:
    """Resolve and validate a composed config; errors name the offending key.

    Hydra's `+key=value` adds keys even to a structured config, and the dataclasses would silently keep or
    drop them: keys outside the schema are refused here. Non-finite numbers are refused everywhere (a NaN
    passes every `< 0` check)."""
    _refuse_unknown_keys(OmegaConf.structured(Config), cfg, "")
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    _refuse_non_finite(OmegaConf.to_container(merged, resolve=True), "")
    return OmegaConf.to_object(merged)


GROUPS_ONLY = ("experiment",)  # Hydra config groups that are not schema keys


def check_override_keys(overrides: List[str], schema_type: type = None) -> None:
    """Every `key=value` override names a key of the schema (or a config group): a typo is refused before Hydra
    composes anything, naming the nearest existing keys (Hydra itself would suggest appending it with `+`)."""
    schema = OmegaConf.structured(schema_type or Config)
    for arg in overrides:
        key, has_value, _ = arg.partition("=")
        if not has_value or key.startswith(("+", "~", "-", "hydra.", "hydra/")) or key in GROUPS_ONLY:
            continue
        node, walked = schema, ""
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(walked + c for c in close)}?" if close else ""
                raise ConfigError(f"unknown key {key!r}: not in the schema (trainer/config.py){hint}")
            node, walked = node._get_node(part), f"{walked}{part}."


def _refuse_unknown_keys(schema, cfg, prefix: str) -> None:
    if not isinstance(cfg, DictConfig) or not isinstance(schema, DictConfig):
        return
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown key {dotted!r}: not in the schema (trainer/config.py){hint}")
        _refuse_unknown_keys(schema._get_node(key), cfg._get_node(key), f"{dotted}.")


def _refuse_non_finite(obj, prefix: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _refuse_non_finite(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _refuse_non_finite(v, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{prefix.rstrip('.')} must be a finite number, got {obj}")


def check_trainable(cfg: Config) -> None:
    """What only building the model would find, found without touching the data: the model name is in the zoo,
    the model accepts this image shape and likelihood (built on the meta device: no memory, ~0.1 s), and the
    likelihood fits the data's pixels (Bernoulli: dynamically binarised; discretized ones: grey levels)."""
    import torch

    from models.registry import build_model

    m, d = cfg.model, cfg.data
    try:
        with torch.device("meta"):
            build_model(m)
    except ValueError as exc:
        raise ConfigError(f"model.name={m.name!r}: {exc}") from None
    binary = m.likelihood == "bernoulli"
    if binary != (d.binarize == "dynamic"):
        raise ConfigError(
            f"model.likelihood={m.likelihood!r} does not fit data.binarize={d.binarize!r}: a Bernoulli likelihood "
            "needs binarised pixels (data.binarize=dynamic), a discretized one needs grey levels (data.binarize=none)")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# what a training run's parameters leave out: evaluation settings (not this run's), test-only fault hooks, and the
# tracking connection (a URI may carry credentials)
NOT_PARAMS = ("eval.", "trainer.fault_", "tracking.", "model_uri")
KEPT_TRACKING = ("tracking.experiment", "tracking.model_name", "tracking.register")


def flat_params(cfg: Config) -> Dict[str, object]:
    """The training run's MLflow parameters: its model, data and trainer config as dotted keys (`trainer.lr`)."""
    def flatten(prefix: str, obj: dict) -> Dict[str, object]:
        out: Dict[str, object] = {}
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else k
            out.update(flatten(key, v) if isinstance(v, dict) else {key: v})
        return out

    return {k: v for k, v in flatten("", asdict(cfg)).items()
            if k in KEPT_TRACKING or not k.startswith(NOT_PARAMS)}
