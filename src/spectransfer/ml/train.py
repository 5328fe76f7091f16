"""Train the 1-D VGG on a store: scratch, fine-tune or frozen convolutions, one to many GPUs.

The whole loop, top to bottom, in the spirit of nanoGPT's train.py: read the settings,
check the inputs (every refusal happens before the first step), set up distributed training
if asked, stream batches from the store, step, evaluate every ``eval_every`` steps, keep
the best weights by validation F1 (or loss), checkpoint, stop when patience runs out.

The paper's recipe is the default: binary cross-entropy on one logit, Adam with lr 1e-3,
batches of 256, early stopping on the validation set; fine-tuning loads every weight of the
pretrained run and trains all layers with a fresh optimizer.

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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spectransfer.provenance import atomic_path, write_text_atomic
from spectransfer import __version__
from spectransfer.ml.dataset import ChunkStream, Selection, select
from spectransfer.errors import TrainError
from spectransfer.locks import OutputLock
from spectransfer.ml.models import ModelConfig, build_model, count_parameters, load_run, save_weights, unwrap

log = logging.getLogger(__name__)

MODES = ("scratch", "finetune", "freeze-conv")
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

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
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
    if cfg.train_limit is not None and cfg.train_limit < 1:
        raise TrainError(f"--train-limit must be >= 1, got {cfg.train_limit}")

    store = open_store(cfg.store)
    surveys = sorted(store.meta["survey"].dropna().unique().tolist())
    if cfg.survey is not None and cfg.survey not in surveys:
        raise TrainError(f"{cfg.store}: store has no spectra of survey {cfg.survey!r} (it holds: {', '.join(surveys) or 'nothing'})")
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

    grid = store.grid
    mconfig = ModelConfig(name=cfg.model, n_bins=grid.n_bins, in_channels=cfg.in_channels)
    init_weights = None
    if cfg.mode == "scratch":
        if cfg.init:
            raise TrainError("--init is only used with --mode finetune or freeze-conv")
    else:
        if not cfg.init:
            raise TrainError(f"--mode {cfg.mode} needs --init RUN (the pretrained run)")
        _, info = load_run(cfg.init)
        if info.model_config != mconfig:
            raise TrainError(
                f"{cfg.init}: incompatible --init: it holds {info.model_config.name} with {info.model_config.in_channels} "
                f"channel(s) on {info.model_config.n_bins} bins, this run needs {mconfig.name} with {mconfig.in_channels} on {mconfig.n_bins}"
            )
        if info.grid != grid:
            raise TrainError(f"{cfg.init}: incompatible --init: trained on grid {info.grid.to_dict()}, the store uses {grid.to_dict()}")
        init_weights = Path(cfg.init) / "model.safetensors"
    return Plan(cfg, store, train, val, mconfig, init_weights)


# ---- entry point ---------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Train (or resume) the run ``cfg.out``; returns a summary of the best evaluation.

    ``devices > 1`` outside torchrun spawns that many local processes (DDP). Under torchrun
    the world comes from its environment variables. One run per folder: a second train into
    the same ``--out`` is refused while the first runs (RUN/run.lock, held by rank 0).
    """
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
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
    return TrainConfig.from_dict(saved["train"])


# ---- the run ------------------------------------------------------------------------------


def _run(cfg: TrainConfig, resume: bool, quiet: bool, checked: Plan | None = None) -> dict[str, Any]:
    out = Path(cfg.out)
    # -- distributed setup: one process per device; rank 0 writes the run folder
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        if not use_cuda:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    master = rank == 0
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if use_cuda else "fp32")
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )

    try:
        p = checked or plan(cfg)
        # -- the model: same initial weights on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(cfg.seed)
        model = build_model(p.model_config)
        if p.init_weights is not None:
            from spectransfer.ml.models import read_weights

            model.load_state_dict(read_weights(p.init_weights)[0])
        if cfg.mode == "freeze-conv":
            for param in model.features.parameters():
                param.requires_grad_(False)
        model.to(device)
        # dropout draws differ per rank, reproducibly
        torch.manual_seed(cfg.seed * 1000 + 17 + rank)
        if use_cuda:
            torch.cuda.manual_seed(cfg.seed * 1000 + 17 + rank)
        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
        optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
        n_pos, n_neg = p.train.n_pos, len(p.train) - p.train.n_pos
        pos_weight = n_neg / n_pos if cfg.imbalance == "pos-weight" else None
        criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device) if pos_weight else None)

        # -- the data: training stream sharded by rank, validation likewise (no shuffling)
        stream_args = dict(ivar=p.store.ivar, in_channels=cfg.in_channels, buffer_chunks=cfg.buffer_chunks, rank=rank, world_size=world)
        train_stream = ChunkStream(
            p.store.flux, p.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
            balanced=cfg.imbalance == "balanced", **stream_args,
        )
        val_stream = ChunkStream(p.store.flux, p.val, batch_size=cfg.eval_batch_size, shuffle=False, **stream_args)
        # a private generator keeps the DataLoader from drawing on the global RNG (dropout's)
        loader_args = dict(pin_memory=use_cuda, generator=torch.Generator())
        train_loader = train_stream.loader(cfg.num_workers, **loader_args)
        val_loader = val_stream.loader(cfg.num_workers, **loader_args)

        # -- state that a checkpoint restores
        state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": 0, "bad_evals": 0, "stopped": False}
        ckpt_path = out / "checkpoints" / "last.pt"
        if resume:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if ckpt["world_size"] != world:
                raise TrainError(f"{ckpt_path}: saved with {ckpt['world_size']} process(es), resumed with {world}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            state.update(ckpt["state"])
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if use_cuda and ckpt["rng"][rank].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
            log.info("resumed %s at step %d (epoch %d, batch %d)", out, state["step"], state["epoch"], state["batch"])

        tb = None
        if master:
            out.mkdir(parents=True, exist_ok=True)
            (out / "checkpoints").mkdir(exist_ok=True)
            _write_config(out, cfg, p, precision, world, pos_weight, model)
            _truncate_metrics(out / "metrics.jsonl", state["step"])
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"), purge_step=state["step"] if resume else None)
        debug_file = None
        if cfg.debug_rows:
            (out / "debug").mkdir(parents=True, exist_ok=True)
            debug_file = open(out / "debug" / f"rows-rank{rank}.txt", "a")

        steps_per_epoch = min(train_stream.batches_per_rank())
        total = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        if master:
            log.info(
                "training %s (%s, %d parameters, %d trainable) on %d train / %d val spectra (%d / %d quasars), "
                "%d step(s) per epoch, %d process(es) on %s, %s",
                p.model_config.name, cfg.mode, count_parameters(model), count_parameters(model, True),
                len(p.train), len(p.val), p.train.n_pos, p.val.n_pos, steps_per_epoch, world, device.type, precision,
            )

        from spectransfer.progress import progress_bar

        loss_acc = torch.zeros((), dtype=torch.float32, device=device)  # sum of batch losses since last eval
        n_acc = 0
        t_last = time.perf_counter()
        seen_since = 0
        with progress_bar("train", total=total, unit="steps", quiet=quiet or not master) as bar:
            bar.advance(state["step"])
            while not state["stopped"] and state["epoch"] < cfg.max_epochs and state["step"] < total:
                train_stream.set_epoch(state["epoch"])
                train_stream.set_start(state["batch"])
                batches = iter(train_loader) if state["batch"] < steps_per_epoch else iter(())
                for x, y, rows in batches:
                    # -- one optimisation step
                    net.train()
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with autocast:
                        logits = net(x)
                    loss = criterion(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    state["step"] += 1
                    state["batch"] += 1
                    loss_acc += loss.detach()  # no .item(): keeps the GPU from syncing every step
                    n_acc += 1
                    seen_since += len(y)
                    bar.advance(1)
                    if debug_file is not None:
                        debug_file.write(f"{state['epoch']} {state['step']} " + " ".join(map(str, rows.tolist())) + "\n")
                        debug_file.flush()
                    last = state["step"] >= total or (
                        state["epoch"] == cfg.max_epochs - 1 and state["batch"] >= steps_per_epoch
                    )
                    # -- evaluate, keep the best, decide whether to stop, checkpoint
                    if state["step"] % cfg.eval_every == 0 or last:
                        rate = seen_since * world / max(time.perf_counter() - t_last, 1e-9)
                        train_loss = _all_sum(torch.tensor([loss_acc.item(), n_acc], dtype=torch.float64), world)
                        metrics = evaluate_stream(net, val_loader, device, autocast, world)
                        metrics.update(step=state["step"], epoch=state["epoch"],
                                       train_loss=float(train_loss[0] / max(train_loss[1], 1)), spectra_per_s=rate)
                        _early_stopping(state, metrics, cfg)
                        if master:
                            if metrics["improved"]:
                                save_weights(model, out / "model.safetensors", p.store.grid, cfg.mode,
                                             extra={"step": str(state["step"]), "store_id": str(p.store.info.get("store_id"))})
                            _log_metrics(out, tb, metrics)
                        if state["batch"] >= steps_per_epoch:
                            state["epoch"] += 1
                            state["batch"] = 0
                        _checkpoint(ckpt_path, model, optimizer, state, world, master)
                        loss_acc.zero_()
                        n_acc = 0
                        seen_since = 0
                        t_last = time.perf_counter()
                    if state["stopped"] or state["step"] >= total or state["batch"] == 0 or state["batch"] >= steps_per_epoch:
                        break  # DDP: every rank stops after the same number of steps
                del batches
                if state["batch"] >= steps_per_epoch:
                    state["epoch"] += 1
                    state["batch"] = 0
        if debug_file is not None:
            debug_file.close()
            if cfg.debug_rows:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          str(out / "debug" / f"final-rank{rank}.safetensors"))
        summary = {"metric": cfg.early_stop, "best": state["best"], "best_step": state["best_step"], "steps": state["step"],
                   "epochs_completed": state["epoch"], "stopped_early": state["stopped"], "run": str(out)}
        if master:
            if tb is not None:
                tb.close()
            _write_json_atomic(out / "summary.json", summary)
        return summary
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def evaluate_stream(net: nn.Module, loader: Any, device: torch.device, autocast: Any, world: int) -> dict[str, Any]:
    """Validation loss and confusion counts at threshold 0.5, summed over every rank."""
    net.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # loss_sum, n, tp, fp, fn, tn
    with torch.no_grad():
        for x, y, _ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits = net(x)
            logits = logits.float()
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            pred = logits > 0  # p > 0.5
            pos = y > 0.5
            sums += torch.tensor([loss.item(), len(y), (pred & pos).sum().item(), (pred & ~pos).sum().item(),
                                  (~pred & pos).sum().item(), (~pred & ~pos).sum().item()], dtype=torch.float64)
    loss_sum, n, tp, fp, fn, tn = _all_sum(sums, world).tolist()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"val_loss": loss_sum / max(n, 1), "val_f1": f1, "val_precision": precision, "val_recall": recall,
            "val_accuracy": (tp + tn) / max(n, 1), "val_n": int(n), "val_tp": int(tp), "val_fp": int(fp),
            "val_fn": int(fn), "val_tn": int(tn)}


def _early_stopping(state: dict[str, Any], metrics: dict[str, Any], cfg: TrainConfig) -> None:
    value = metrics["val_f1"] if cfg.early_stop == "f1" else metrics["val_loss"]
    better = state["best"] is None or (value > state["best"] if cfg.early_stop == "f1" else value < state["best"])
    metrics["improved"] = better
    if better:
        state.update(best=value, best_step=state["step"], bad_evals=0)
    else:
        state["bad_evals"] += 1
        if state["bad_evals"] >= cfg.patience:
            state["stopped"] = True
    metrics["best"] = state["best"]


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)  # gloo and nccl both sum float64 on the CPU/GPU tensor given
    return t


def _checkpoint(path: Path, model: nn.Module, optimizer: Any, state: dict, world: int, master: bool) -> None:
    """Model, optimizer, stream position and every rank's RNG state, written atomically."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if not master:
        return
    ckpt = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "state": dict(state),
            "rng": rngs, "world_size": world, "version": __version__}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def _write_config(out: Path, cfg: TrainConfig, p: Plan, precision: str, world: int, pos_weight: float | None, model: nn.Module) -> None:
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
            "n_parameters": count_parameters(model),
            "n_trainable": count_parameters(model, True),
            **({"pos_weight": pos_weight} if pos_weight else {}),
        },
        "model": p.model_config.to_dict(),
        "store": {"path": str(p.store.path), "store_id": str(p.store.info.get("store_id")), "grid": p.store.grid.to_dict()},
        "spectransfer_version": __version__,
        "torch_version": torch.__version__,
    }
    write_text_atomic(out / "config.toml", tomli_w.dumps(doc))


def _log_metrics(out: Path, tb: Any, metrics: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(metrics) + "\n")
    step = metrics["step"]
    for key in ("train_loss", "val_loss", "val_f1", "val_precision", "val_recall", "spectra_per_s"):
        tb.add_scalar(key.replace("_", "/", 1), metrics[key], step)
    tb.flush()
    log.info("step %d: train loss %.4f, val loss %.4f, F1 %.4f (P %.4f R %.4f)%s", step, metrics["train_loss"],
             metrics["val_loss"], metrics["val_f1"], metrics["val_precision"], metrics["val_recall"],
             " *" if metrics["improved"] else "")


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
