"""Train the 1-D VGG on a store: scratch, fine-tune or frozen convolutions, one to many GPUs.

The whole loop, top to bottom, in the spirit of nanoGPT's train.py: read the settings,
check the inputs (every refusal happens before the first step), set up distributed training
if asked, stream batches from the store, step, evaluate every ``eval_every`` steps, keep
the best weights by validation F1 (or loss), checkpoint, stop when patience runs out.

The paper's recipe is the default: binary cross-entropy on one logit, Adam with lr 1e-3,
batches of 256, early stopping on the validation set; fine-tuning loads every weight of the
pretrained run and trains all layers with a fresh optimizer.

The redshift head (``--z-head``, on by default) adds ``z_weight`` x its cross-entropy on the
training quasars that have a catalogue redshift (``catalog_z``) to the BCE of every spectrum;
early stopping still watches the classifier. With ``--z-shift`` each such quasar is seen by the
z head a second time, moved along the logarithmic grid to another redshift (see ``_train_step``).
Transfer loads the z head with the rest when the init run has one of the same kind and starts
a fresh one when it has not.

Determinism: with a fixed seed a run's result depends only on its settings. The data order
is a function of (seed, epoch, rank, world size, workers) (see ``dataset.ChunkStream``), the
checkpoint holds the model, the optimizer, every rank's RNG state and the stream position,
so a run killed at any moment and resumed with ``--resume`` ends with the weights an
uninterrupted run would have (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from spectransfer import __version__
from spectransfer.errors import TrainError
from spectransfer.locks import OutputLock
from spectransfer.ml.dataset import ChunkStream, Selection, redshift_augment, select
from spectransfer.ml.models import (
    VGG1D,
    Z_BINS,
    Z_HEAD_KINDS,
    Z_MAX,
    ModelConfig,
    build_model,
    count_parameters,
    load_init_weights,
    load_run,
    read_weights,
    redshift_from_head,
    save_weights,
    shift_z_bins,
    unwrap,
    z_targets,
)
from spectransfer.ml.refine import CATASTROPHIC_KMS, velocity_offset_kms
from spectransfer.progress import progress_bar
from spectransfer.provenance import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

MODES = ("scratch", "finetune", "freeze-conv")
# Weight of the z head's cross-entropy against the classifier's BCE. Measured (dense head) on a simulated
# SDSS-like store (3127 train spectra, 800 steps of 32, test 386 with 119 quasars): test F1
# 0.971 without the z head, 0.967 at 0.1 (paired bootstrap ΔF1 -0.004 [-0.028, 0.017]),
# 0.954 at 1.0 (ΔF1 -0.017 [-0.039, 0.004], p 0.13) which learns z faster (val catastrophic
# 12% against 23% at step 800). 0.1 is the largest tried that leaves F1 where it was.
# Re-measured with the shift head (the demo's fine-tuning: its LAMOST pretraining, 588 steps of
# 64, bf16; 2-core Xeon): network z catastrophic on the demo's 102 test quasars / on 629
# quasars of an independent simulated SDSS-like survey (seed 77): 0.1: 3.9% / 4.5%, 0.3: 2.9% /
# 3.0%, 0.6: 2.0% / 2.9%; F1 on the independent survey 0.921 / 0.925 / 0.926 (paired ΔF1
# 0.1 - 0.3: -0.004 [-0.015, 0.009]), on the test split 0.975 / 0.970 / 0.970.
Z_WEIGHT = 0.6
# The redshift head: "shift" (models.ShiftZHead, one rest-frame pattern correlated along the
# grid) or "dense" (8192 -> 256 -> 300, the first head).
Z_HEAD_KIND = "shift"
# Largest redshift augmentation shift, in grid bins (``dataset.redshift_shift``), and never more
# than an eighth of the grid: on the paper's grid 256 bins are 0.046 dex, (1+z) times 0.90-1.11.
# Measured with the shift head (375 fine-tuning steps, 816 simulated test quasars): 7.8%
# catastrophic network z with shifts of up to 256 bins, 8.1% without: little gain, ~14% more
# rows per SDSS batch; kept, as the demo's figures were measured with it.
Z_SHIFT = 256
# Fraction of the training rows shown at a lower S/N each epoch (``dataset.shallower``): real
# surveys hold galaxies and stars down to S/N ~1, the simulation's are brighter than its quasars.
# Off by default: no consistent gain on real spectra. Measured (2-core Xeon): fine-tuning the
# demo's way from one LAMOST run, 3 seeds each, the shared real files made fainter
# (``bench/sim_to_real.py --depth``, 6 draws; quasars found / SDSS others / LAMOST stars called
# quasars): at median S/N 2, 0: 83% / 6% / 8%, 0.5: 87% / 13% / 13%; at S/N 3, 88% / 4% / 2%
# against 91% / 5% / 5%; the files as they are: the same. The seeds differ more than the
# settings (S/N 2, SDSS others: 3-8% at 0, 10-17% at 0.5). The simulated test split's F1 rose
# (0.944-0.964 -> 0.970-0.975), the simulation's own test, which is not where the doubt lies.
DEPTH_AUGMENT = 0.0
# Weight averaging (--ema): the run keeps, beside the weights it steps, their exponential moving
# average over the steps (Polyak averaging; decay 0.99 averages over ~100 steps), and validates,
# early-stops on and saves the average. A short fine-tune ends while its weights still wander
# from step to step; averaging them removes that wander without another step of training.
# 0 = off (the paper's recipe: the stepped weights).
EMA_DECAY = 0.0
IMBALANCE = ("none", "pos-weight", "balanced")
IMBALANCE_HELP = (
    "How to treat the rare class. 'none' (the paper): plain BCE on the natural mix. "
    "'pos-weight': BCE with pos_weight = n_negative/n_positive of the training rows, so each "
    "quasar counts as much as all others together; raises recall at threshold 0.5, lowers "
    "precision, and pushes raw probabilities up (calibrate with `evaluate`). 'balanced': the "
    "stream resamples each window with replacement so about half of every batch is quasars "
    "(rare positives repeat); same effect on probabilities, more steps see positives."
)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; saved to RUN/config.toml."""

    store: str
    out: str
    survey: str | None = None
    mode: str = "scratch"
    init: str | None = None
    model: str = "vgg-a"
    in_channels: int = 1
    max_epochs: int = 50
    max_steps: int | None = None
    seed: int = 0
    devices: int = 1
    device: str = "auto"
    batch_size: int = 256
    lr: float = 1e-3
    eval_every: int = 1000
    patience: int = 10
    early_stop: str = "f1"
    imbalance: str = "none"
    precision: str = "auto"
    train_fraction: float | None = None
    train_limit: int | None = None
    num_workers: int = 2
    buffer_chunks: int = 4
    eval_batch_size: int = 512
    debug_rows: bool = False
    z_head: bool = True
    z_weight: float = Z_WEIGHT
    z_shift: int = Z_SHIFT
    z_head_kind: str = Z_HEAD_KIND
    depth_augment: float = DEPTH_AUGMENT
    ema: float = EMA_DECAY

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- checks that run before anything trains --------------------------------------------


@dataclass
class Plan:
    """What the checks found: the data selections and, for transfer, the init run."""

    cfg: TrainConfig
    store: Any
    train: Selection
    val: Selection
    model_config: ModelConfig
    init_weights: Path | None


def plan(cfg: TrainConfig) -> Plan:
    """Open the store and check everything a run needs; TrainError names what is wrong."""
    from spectransfer.data.store import open_store

    if cfg.mode not in MODES:
        raise TrainError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.imbalance not in IMBALANCE:
        raise TrainError(f"--imbalance must be one of {', '.join(IMBALANCE)}, got {cfg.imbalance!r}")
    if cfg.early_stop not in ("f1", "loss"):
        raise TrainError(f"--early-stop must be f1 or loss, got {cfg.early_stop!r}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise TrainError(f"--precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    for name in ("batch_size", "eval_every", "patience", "max_epochs", "devices", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.train_fraction is not None and not 0.0 < cfg.train_fraction <= 1.0:
        raise TrainError(f"--train-fraction must be in (0, 1], got {cfg.train_fraction}")
    if not cfg.z_weight >= 0.0:
        raise TrainError(f"--z-weight must be >= 0, got {cfg.z_weight}")
    if cfg.z_head_kind not in Z_HEAD_KINDS:
        raise TrainError(f"--z-head-kind must be one of {', '.join(Z_HEAD_KINDS)}, got {cfg.z_head_kind!r}")
    if not 0.0 <= cfg.ema < 1.0:
        raise TrainError(f"--ema must be in [0, 1) (0 = off), got {cfg.ema}")
    if not 0.0 <= cfg.depth_augment <= 1.0:
        raise TrainError(f"--depth-augment must be in [0, 1] (0 = off), got {cfg.depth_augment}")
    if cfg.z_shift < 0:
        raise TrainError(f"--z-shift must be >= 0 bins (0 = no redshift augmentation), got {cfg.z_shift}")
    if cfg.train_limit is not None and cfg.train_limit < 1:
        raise TrainError(f"--train-limit must be >= 1, got {cfg.train_limit}")

    store = open_store(cfg.store)
    surveys = sorted(store.meta["survey"].dropna().unique().tolist())
    if cfg.survey is not None and cfg.survey not in surveys:
        raise TrainError(
            f"{cfg.store}: store has no spectra of survey {cfg.survey!r} (it holds: {', '.join(surveys) or 'nothing'})"
        )
    train = select(store, cfg.survey, "train").subset(cfg.train_fraction, cfg.train_limit, cfg.seed)
    val = select(store, cfg.survey, "val")
    what = f"{cfg.store} (survey {cfg.survey or 'all'})"
    if len(train) == 0:
        raise TrainError(f"{what}: no training rows (split == 'train')")
    if len(val) == 0:
        raise TrainError(f"{what}: no validation rows (split == 'val'); early stopping needs them")
    if train.n_pos == 0:
        raise TrainError(f"{what}: the training rows hold no positive (quasar) example")
    if train.n_pos == len(train):
        raise TrainError(f"{what}: the training rows hold no negative (non-quasar) example")
    if cfg.depth_augment > 0 and (train.snr is None or not np.isfinite(train.snr).any()):
        raise TrainError(
            f"{what}: --depth-augment needs each spectrum's median S/N (meta column snr), which this store "
            "has not got (ingest it again, or train with --depth-augment 0)"
        )
    _check_world(cfg, train, int(store.flux.chunks[0]), what)

    grid = store.grid
    z_bins = (shift_z_bins(grid.log_step) if cfg.z_head_kind == "shift" else Z_BINS) if cfg.z_head else 0
    mconfig = ModelConfig(
        name=cfg.model, n_bins=grid.n_bins, in_channels=cfg.in_channels, z_bins=z_bins, z_head_kind=cfg.z_head_kind
    )
    init_weights = None
    if cfg.mode == "scratch":
        if cfg.init:
            raise TrainError("--init is only used with --mode finetune or freeze-conv")
    else:
        if not cfg.init:
            raise TrainError(f"--mode {cfg.mode} needs --init RUN (the pretrained run)")
        _, info = load_run(cfg.init)
        if info.model_config.trunk() != mconfig.trunk():
            raise TrainError(
                f"{cfg.init}: incompatible --init: it holds {info.model_config.name} with {info.model_config.in_channels} "
                f"channel(s) on {info.model_config.n_bins} bins, this run needs {mconfig.name} with {mconfig.in_channels} on {mconfig.n_bins}"
            )
        if info.grid != grid:
            raise TrainError(
                f"{cfg.init}: incompatible --init: trained on grid {info.grid.to_dict()}, the store uses {grid.to_dict()}"
            )
        init_weights = Path(cfg.init) / "model.safetensors"
    return Plan(cfg, store, train, val, mconfig, init_weights)


def native_bf16_cpu() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast trains the
    VGG ~1.4x (2 cores) to 2x (16 cores) faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def steps_per_epoch(stream: ChunkStream, epochs: int) -> list[int]:
    """Optimisation steps of each epoch: the fewest batches any rank's stream yields in it.

    With several loader workers the windows fall to the workers differently every epoch and
    each worker ends on its own partial batch, so the count moves by a batch or two between
    epochs; one count taken from the first epoch would end a later epoch early or wait for a
    batch that never comes."""
    counts = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        counts.append(min(stream.batches_per_rank()))
    return counts


def _uses_cuda(cfg: TrainConfig) -> bool:
    """Whether this run's processes train on GPUs (``--device cuda``, or auto with one present)."""
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def _check_world(cfg: TrainConfig, train: Selection, chunk_rows: int, what: str) -> None:
    """Refuse a world that cannot run: more local GPU processes than GPUs, or a rank that would
    get no training batch (windows of ``buffer_chunks`` store chunks go to the ranks in turn)."""
    size = int(os.environ.get("WORLD_SIZE", cfg.devices))
    use_cuda = _uses_cuda(cfg)
    if use_cuda and "WORLD_SIZE" not in os.environ and cfg.devices > torch.cuda.device_count():
        raise TrainError(
            f"--devices {cfg.devices} asks for {cfg.devices} GPU processes but this machine has "
            f"{torch.cuda.device_count()} GPU(s); use --device cpu for CPU processes or fewer --devices"
        )
    n_windows = -(-np.unique(train.rows // chunk_rows).size // cfg.buffer_chunks)
    if size > n_windows:
        raise TrainError(
            f"{what}: {len(train)} training rows fill {n_windows} window(s) of {cfg.buffer_chunks} store chunks, "
            f"too few for {size} processes (each needs at least one); use fewer --devices or a larger store"
        )


# ---- entry point ---------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Train (or resume) the run ``cfg.out``; returns a summary of the best evaluation.

    ``devices > 1`` outside torchrun spawns that many local processes (DDP). Under torchrun
    the world comes from its environment variables. One run per folder: a second train into
    the same ``--out`` is refused while the first runs (RUN/run.lock, held by rank 0).
    """
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):  # the CLI asks for > 0; 0 (weights kept) serves tests
        raise TrainError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if (cfg.max_steps is not None and cfg.max_steps < 1) or cfg.num_workers < 0:
        raise TrainError(f"--max-steps must be >= 1 and --workers >= 0, got {cfg.max_steps} and {cfg.num_workers}")
    rank0 = os.environ.get("RANK", "0") == "0"
    with OutputLock(Path(cfg.out) / "run.lock", "a train run") if rank0 else nullcontext():
        return _train(cfg, resume, quiet)


def _train(cfg: TrainConfig, resume: bool, quiet: bool) -> dict[str, Any]:
    out = Path(cfg.out)
    if resume:
        cfg = _resume_config(cfg)
    elif (out / "checkpoints" / "last.pt").exists():
        raise TrainError(f"{out}: already holds a run; add --resume to continue it or choose another --out")
    checked = plan(cfg)  # refuse bad input once, in this process, before any worker starts
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if cfg.devices > 1 and not under_torchrun:
        import torch.multiprocessing as mp

        port = _free_port()
        mp.start_processes(_spawned, args=(cfg, resume, quiet, port), nprocs=cfg.devices, start_method="spawn")
        return json.loads((out / "summary.json").read_text())
    return _run(cfg, resume, quiet, checked)


def _spawned(rank: int, cfg: TrainConfig, resume: bool, quiet: bool, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg.devices), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    _run(cfg, resume, quiet)


def _resume_config(cfg: TrainConfig) -> TrainConfig:
    """The saved settings of the run at ``cfg.out`` (the command line's are ignored)."""
    import tomllib

    out = Path(cfg.out)
    if not (out / "checkpoints" / "last.pt").exists() or not (out / "config.toml").exists():
        raise TrainError(f"{out}: nothing to resume (no checkpoints/last.pt)")
    with open(out / "config.toml", "rb") as fh:
        saved = tomllib.load(fh)
    # a run started before the redshift head, its augmentations or --ema existed has none of them
    return TrainConfig.from_dict(
        {"z_head": False, "z_shift": 0, "z_head_kind": "dense", "depth_augment": 0.0, "ema": 0.0, **saved["train"]}
    )


# ---- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes, and its device."""

    size: int
    rank: int
    local_rank: int
    device: torch.device
    use_cuda: bool

    @property
    def master(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """Where a run stands; a checkpoint saves it with the weights, optimizer and RNG states."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this epoch consumed (the stream's position)
    best: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    stopped: bool = False

    def count_step(self, steps_per_epoch: int) -> None:
        """One optimisation step done. The one place an epoch ends."""
        self.step += 1
        self.batch += 1
        if self.batch >= steps_per_epoch:
            self.epoch += 1
            self.batch = 0


@dataclass
class Session:
    """What a run trains with: the network (bare and as stepped), optimizer, loss and data."""

    model: VGG1D
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    loss: Loss
    train_stream: ChunkStream
    train_loader: Any
    val_loader: Any
    autocast: Any
    precision: str
    z_shift: int = 0  # largest redshift augmentation shift in bins (0: none), <= n_bins / 8
    log_step: float = 0.0  # the store grid's log10 step: what one bin of shift means in z
    seed: int = 0
    rank: int = 0
    ema: WeightAverage | None = None  # the weights' moving average (--ema), validated and saved in their stead

    @property
    def evaluated(self) -> nn.Module:
        """The network that validation sees and the run saves: the average if kept, else the one stepped."""
        return self.ema.model if self.ema is not None else self.net

    @property
    def saved(self) -> VGG1D:
        return self.ema.model if self.ema is not None else self.model


class WeightAverage:
    """An exponential moving average of a model's weights, updated after every step.

    The decay warms up as min(decay, (1 + t) / (10 + t)) after t updates (TensorFlow's
    ExponentialMovingAverage with num_updates), so the first steps away from the initial
    (e.g. pretrained) weights are not averaged in at 99%."""

    def __init__(self, model: VGG1D, decay: float) -> None:
        import copy

        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: VGG1D) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        mine = [q for q in self.model.parameters() if q.dtype.is_floating_point]
        theirs = [q.detach() for q in model.parameters() if q.dtype.is_floating_point]
        torch._foreach_lerp_(mine, theirs, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


@dataclass
class Loss:
    """BCE on every spectrum + ``z_weight`` x the z head's cross-entropy on quasars with a z."""

    bce: nn.BCEWithLogitsLoss
    z_weight: float
    z_bins: int  # 0: no z head

    def __call__(
        self, logits: torch.Tensor, z_logits: torch.Tensor | None, y: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, the BCE part). ``logits`` and ``y`` are the classifier's rows; ``z_logits``
        and ``z`` may hold more rows after them (redshift-shifted copies seen by the z head only)."""
        bce = self.bce(logits.float(), y)
        if z_logits is None:
            return bce, bce
        return bce + self.z_weight * z_cross_entropy(z_logits, z, self.z_bins), bce


def z_cross_entropy(z_logits: torch.Tensor, z: torch.Tensor, n_bins: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the z head against Gaussian-smoothed targets, over rows with a finite
    z. A batch without any gives 0 that still touches every z-head weight (DDP needs that)."""
    has = torch.isfinite(z)
    if not bool(has.any()):
        return z_logits.float().sum() * 0.0
    logp = torch.log_softmax(z_logits[has].float(), dim=1)
    ce = -(z_targets(z[has], n_bins) * logp).sum(dim=1)
    return ce.mean() if reduction == "mean" else ce.sum()


def _join_world(cfg: TrainConfig) -> World:
    """One process per device; under torchrun or ``devices > 1`` join the process group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = _uses_cuda(cfg)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=size)
        if not use_cuda:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    return World(size, rank, local_rank, device, use_cuda)


def _build_session(cfg: TrainConfig, p: Plan, world: World) -> Session:
    """The model (init weights loaded), optimizer, loss and data loaders of this process."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(p.model_config)
    if p.init_weights is not None:
        load_init_weights(model, read_weights(p.init_weights)[0], p.init_weights)
    if cfg.mode == "freeze-conv":
        for param in model.features.parameters():
            param.requires_grad_(False)
    model.to(world.device)
    torch.manual_seed(cfg.seed * 1000 + 17 + world.rank)  # dropout draws differ per rank, reproducibly
    if world.use_cuda:
        torch.cuda.manual_seed(cfg.seed * 1000 + 17 + world.rank)
    net: nn.Module = model
    if world.size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[world.local_rank] if world.use_cuda else None)
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
    pos_weight = _pos_weight(cfg, p)
    bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=world.device) if pos_weight else None)
    loss = Loss(bce, cfg.z_weight, p.model_config.z_bins)

    # training stream sharded by rank, validation likewise (no shuffling)
    stream_args = dict(
        ivar=p.store.ivar, in_channels=cfg.in_channels, buffer_chunks=cfg.buffer_chunks, rank=world.rank, world_size=world.size
    )
    train_stream = ChunkStream(
        p.store.flux,
        p.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        balanced=cfg.imbalance == "balanced",
        depth=cfg.depth_augment,
        grid=p.store.grid,
        **stream_args,
    )
    val_stream = ChunkStream(p.store.flux, p.val, batch_size=cfg.eval_batch_size, shuffle=False, **stream_args)
    # a private generator keeps the DataLoader from drawing on the global RNG (dropout's)
    loader_args = dict(pin_memory=world.use_cuda, generator=torch.Generator())
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if world.use_cuda or native_bf16_cpu() else "fp32")
    autocast = torch.autocast(device_type=world.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    return Session(
        model,
        net,
        optimizer,
        loss,
        train_stream,
        train_stream.loader(cfg.num_workers, **loader_args),
        val_stream.loader(cfg.num_workers, **loader_args),
        autocast,
        precision,
        min(cfg.z_shift, p.store.grid.n_bins // 8) if p.model_config.has_z_head else 0,
        p.store.grid.log_step,
        cfg.seed,
        world.rank,
        WeightAverage(model, cfg.ema) if cfg.ema > 0 else None,
    )


def _pos_weight(cfg: TrainConfig, p: Plan) -> float | None:
    return (len(p.train) - p.train.n_pos) / p.train.n_pos if cfg.imbalance == "pos-weight" else None


def _restore(path: Path, s: Session, world: World) -> TrainState:
    """The state, weights, optimizer and this rank's RNG of the checkpoint at ``path``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["world_size"] != world.size:
        raise TrainError(f"{path}: saved with {ckpt['world_size']} process(es), resumed with {world.size}")
    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    if s.ema is not None:
        if ckpt.get("ema") is None:
            raise TrainError(f"{path}: saved without --ema, resumed with it")
        s.ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"][world.rank]["cpu"])
    if world.use_cuda and ckpt["rng"][world.rank].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"][world.rank]["cuda"])
    return TrainState(**ckpt["state"])


def _train_step(s: Session, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, device: torch.device, step: int) -> torch.Tensor:
    """One optimisation step on a batch; returns the batch's total loss (on the device).

    With ``z_shift``, every quasar of the batch with a catalogue z also goes through the network
    once more, moved along the grid to a random other redshift (``dataset.redshift_augment``;
    the draws depend on seed, step and rank, so a resumed run draws the same). The copies feed
    the z loss only: the classifier never sees their zero-filled edges, which would otherwise
    mark quasars (only they are shifted), so classification trains on the paper's inputs."""
    s.net.train()
    x, y, z = (t.to(device, non_blocking=True) for t in (x, y, z))
    n = x.shape[0]
    if s.z_shift:
        x_aug, z_aug = redshift_augment(x, z, s.z_shift, s.log_step, Z_MAX, [s.seed, step, s.rank, 0x25])
        x, z = torch.cat([x, x_aug]), torch.cat([z, z_aug])
    with s.autocast:
        logits, z_logits = s.net(x, with_z=True)
    loss, _ = s.loss(logits[:n], z_logits, y, z)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    if s.ema is not None:
        s.ema.update(s.model)
    return loss.detach()


def _logged_rows(batches: Any, path: Path, state: TrainState) -> Iterator[Any]:
    """``--debug-rows``: the batches, with the rows of each written to ``path`` as it is taken."""
    with open(path, "a") as fh:
        for batch in batches:
            fh.write(f"{state.epoch} {state.step + 1} " + " ".join(map(str, batch[2].tolist())) + "\n")
            fh.flush()
            yield batch


def _save_final_weights(model: VGG1D, path: Path) -> None:
    """``--debug-rows``: this rank's weights at the end (DDP ranks must agree)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def _run(cfg: TrainConfig, resume: bool, quiet: bool, checked: Plan | None = None) -> dict[str, Any]:
    """Train this process's share of the run; rank 0 writes the run folder."""
    out = Path(cfg.out)
    world = _join_world(cfg)
    try:
        p = checked or plan(cfg)
        s = _build_session(cfg, p, world)
        ckpt_path = out / "checkpoints" / "last.pt"
        state = _restore(ckpt_path, s, world) if resume else TrainState()
        if resume:
            log.info("resumed %s at step %d (epoch %d, batch %d)", out, state.step, state.epoch, state.batch)
        run_log = _RunLog.open(out, cfg, p, s, world, state.step, resume) if world.master else None
        if cfg.debug_rows:
            (out / "debug").mkdir(parents=True, exist_ok=True)

        per_epoch = steps_per_epoch(s.train_stream, cfg.max_epochs)
        total = sum(per_epoch) if cfg.max_steps is None else min(sum(per_epoch), cfg.max_steps)
        if world.master:
            log.info(
                "training %s (%s, %d parameters, %d trainable, z head %s) on %d train / %d val spectra "
                "(%d / %d quasars, %d with z), %d step(s) per epoch, %d process(es) on %s, %s",
                p.model_config.name,
                cfg.mode,
                count_parameters(s.model),
                count_parameters(s.model, True),
                "on" if p.model_config.has_z_head else "off",
                len(p.train),
                len(p.val),
                p.train.n_pos,
                p.val.n_pos,
                p.train.n_z,
                per_epoch[0],
                world.size,
                world.device.type,
                s.precision,
            )

        window = _Window(world.device)  # training loss and throughput since the last evaluation
        with progress_bar("train", total=total, unit="steps", quiet=quiet or not world.master) as bar:
            bar.advance(state.step)
            while not state.stopped and state.epoch < cfg.max_epochs and state.step < total:
                s.train_stream.set_epoch(state.epoch)
                s.train_stream.set_start(state.batch)
                steps_this_epoch = per_epoch[state.epoch]
                batches = iter(s.train_loader)
                if cfg.debug_rows:
                    batches = _logged_rows(batches, out / "debug" / f"rows-rank{world.rank}.txt", state)
                for x, y, rows in batches:
                    epoch = state.epoch
                    z = torch.from_numpy(p.train.z_of(rows.numpy()))
                    window.add(_train_step(s, x, y, z, world.device, state.step), len(y))
                    state.count_step(steps_this_epoch)
                    bar.advance(1)
                    if state.step % cfg.eval_every == 0 or state.step >= total or state.epoch >= cfg.max_epochs:
                        metrics = _evaluate(s, p, world, window, state, epoch, cfg)
                        if run_log is not None:
                            run_log.write(metrics, s.saved, state, p)
                        _checkpoint(ckpt_path, s, state, world.size, world.master)
                    if state.stopped or state.step >= total or state.batch == 0:
                        break  # DDP: every rank stops after the same number of steps
                else:  # every rank's stream holds at least steps_this_epoch batches
                    raise TrainError(f"{cfg.store}: the training stream ended after {state.batch} of {steps_this_epoch} batches")
                del batches
        if cfg.debug_rows:
            _save_final_weights(s.model, out / "debug" / f"final-rank{world.rank}.safetensors")
        summary = {
            "metric": cfg.early_stop,
            "best": state.best,
            "best_step": state.best_step,
            "steps": state.step,
            "epochs_completed": state.epoch,
            "stopped_early": state.stopped,
            "run": str(out),
        }
        if run_log is not None:
            run_log.close()
            _write_json_atomic(out / "summary.json", summary)
        return summary
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Window:
    """Sums of the training loss, steps and spectra since the last evaluation."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps = 0
        self.seen = 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.loss += loss  # no .item(): keeps the GPU from syncing every step
        self.steps += 1
        self.seen += n


def _evaluate(
    s: Session, p: Plan, world: World, window: _Window, state: TrainState, epoch: int, cfg: TrainConfig
) -> dict[str, Any]:
    """Validation metrics, early-stopping bookkeeping, and the training window's summary."""
    rate = window.seen * world.size / max(time.perf_counter() - window.t0, 1e-9)
    train_loss = _all_sum(torch.tensor([window.loss.item(), window.steps], dtype=torch.float64), world.size)
    metrics = evaluate_stream(s.evaluated, s.val_loader, world.device, s.autocast, world.size, p.val)
    metrics.update(step=state.step, epoch=epoch, train_loss=float(train_loss[0] / max(train_loss[1], 1)), spectra_per_s=rate)
    _early_stopping(state, metrics, cfg)
    window.reset()
    return metrics


def evaluate_stream(
    net: nn.Module, loader: Any, device: torch.device, autocast: Any, world: int, selection: Selection | None = None
) -> dict[str, Any]:
    """Validation loss and confusion counts at threshold 0.5, summed over every rank; with a
    z head and ``selection`` (for the rows' redshifts), the z head's cross-entropy and its
    catastrophic fraction (|Δv| > 3000 km/s) on the quasars with a catalogue z."""
    net.eval()
    sums = torch.zeros(9, dtype=torch.float64)  # loss_sum, n, tp, fp, fn, tn, z_ce_sum, n_z, n_catastrophic
    has_z = False
    with torch.no_grad():
        for x, y, rows in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits, z_logits = net(x, with_z=True)
            logits = logits.float()
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            pred = logits > 0  # p > 0.5
            pos = y > 0.5
            z_part = [0.0, 0.0, 0.0]
            if z_logits is not None and selection is not None:
                has_z = True
                z_true = selection.z_of(rows.numpy())
                ok = np.isfinite(z_true)
                if ok.any():
                    ce = z_cross_entropy(z_logits, torch.from_numpy(z_true).to(device), z_logits.shape[1], "sum")
                    z_net, _ = redshift_from_head(z_logits[torch.from_numpy(ok).to(device)])
                    dv = np.abs(velocity_offset_kms(z_net, z_true[ok]))
                    z_part = [ce.item(), float(ok.sum()), float((dv > CATASTROPHIC_KMS).sum())]
            sums += torch.tensor(
                [
                    loss.item(),
                    len(y),
                    (pred & pos).sum().item(),
                    (pred & ~pos).sum().item(),
                    (~pred & pos).sum().item(),
                    (~pred & ~pos).sum().item(),
                    *z_part,
                ],
                dtype=torch.float64,
            )
    loss_sum, n, tp, fp, fn, tn, z_ce, n_z, n_cat = _all_sum(sums, world).tolist()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {
        "val_loss": loss_sum / max(n, 1),
        "val_f1": f1,
        "val_precision": precision,
        "val_recall": recall,
        "val_accuracy": (tp + tn) / max(n, 1),
        "val_n": int(n),
        "val_tp": int(tp),
        "val_fp": int(fp),
        "val_fn": int(fn),
        "val_tn": int(tn),
    }
    if has_z:
        out.update(val_z_loss=z_ce / n_z if n_z else None, val_z_n=int(n_z), val_z_catastrophic=n_cat / n_z if n_z else None)
    return out


def _early_stopping(state: TrainState, metrics: dict[str, Any], cfg: TrainConfig) -> None:
    value = metrics["val_f1"] if cfg.early_stop == "f1" else metrics["val_loss"]
    better = state.best is None or (value > state.best if cfg.early_stop == "f1" else value < state.best)
    metrics["improved"] = better
    if better:
        state.best, state.best_step, state.bad_evals = value, state.step, 0
    else:
        state.bad_evals += 1
        state.stopped = state.bad_evals >= cfg.patience
    metrics["best"] = state.best


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)  # gloo and nccl both sum float64 on the CPU/GPU tensor given
    return t


def _checkpoint(path: Path, s: Session, state: TrainState, world: int, master: bool) -> None:
    """Model, optimizer, the weights' average, stream position and every rank's RNG state, written atomically."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if not master:
        return
    ckpt = {
        "model": unwrap(s.model).state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "ema": None if s.ema is None else s.ema.state_dict(),
        "state": dataclasses.asdict(state),
        "rng": rngs,
        "world_size": world,
        "version": __version__,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


class _RunLog:
    """Rank 0's run folder: config.toml, metrics.jsonl, TensorBoard events and the best weights."""

    def __init__(self, out: Path, tb: Any) -> None:
        self.out = out
        self.tb = tb

    @classmethod
    def open(cls, out: Path, cfg: TrainConfig, p: Plan, s: Session, world: World, step: int, resume: bool) -> _RunLog:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        _write_config(out, cfg, p, s.precision, world.size, _pos_weight(cfg, p), s.model)
        _truncate_metrics(out / "metrics.jsonl", step)
        return cls(out, SummaryWriter(str(out / "tb"), purge_step=step if resume else None))

    def write(self, metrics: dict[str, Any], model: VGG1D, state: TrainState, p: Plan) -> None:
        if metrics["improved"]:
            save_weights(
                model,
                self.out / "model.safetensors",
                p.store.grid,
                p.cfg.mode,
                extra={"step": str(state.step), "store_id": str(p.store.info.get("store_id"))},
            )
        _log_metrics(self.out, self.tb, metrics)

    def close(self) -> None:
        self.tb.close()


def _write_config(
    out: Path, cfg: TrainConfig, p: Plan, precision: str, world: int, pos_weight: float | None, model: nn.Module
) -> None:
    import tomli_w

    doc = {
        "train": cfg.to_dict(),
        "resolved": {
            "precision": precision,
            "world_size": world,
            "n_train": len(p.train),
            "n_train_positive": p.train.n_pos,
            "n_val": len(p.val),
            "n_val_positive": p.val.n_pos,
            "n_train_with_z": p.train.n_z,
            "n_parameters": count_parameters(model),
            "n_trainable": count_parameters(model, True),
            **({"pos_weight": pos_weight} if pos_weight else {}),
        },
        "model": p.model_config.to_dict(),
        "store": {
            "path": str(p.store.path),
            "store_id": str(p.store.info.get("store_id")),
            "origin": str(p.store.info.get("origin", "unknown")),
            "grid": p.store.grid.to_dict(),
        },
        "spectransfer_version": __version__,
        "torch_version": torch.__version__,
    }
    write_text_atomic(out / "config.toml", tomli_w.dumps(doc))


def _log_metrics(out: Path, tb: Any, metrics: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(metrics) + "\n")
    step = metrics["step"]
    for key in (
        "train_loss",
        "val_loss",
        "val_f1",
        "val_precision",
        "val_recall",
        "spectra_per_s",
        "val_z_loss",
        "val_z_catastrophic",
    ):
        if metrics.get(key) is not None:
            tb.add_scalar(key.replace("_", "/", 1), metrics[key], step)
    tb.flush()
    z = ""
    if metrics.get("val_z_loss") is not None:
        z = f", z CE {metrics['val_z_loss']:.3f}, catastrophic {metrics['val_z_catastrophic']:.3f}"
    log.info(
        "step %d: train loss %.4f, val loss %.4f, F1 %.4f (P %.4f R %.4f)%s%s",
        step,
        metrics["train_loss"],
        metrics["val_loss"],
        metrics["val_f1"],
        metrics["val_precision"],
        metrics["val_recall"],
        z,
        " *" if metrics["improved"] else "",
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint (the resumed run rewrites them)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
