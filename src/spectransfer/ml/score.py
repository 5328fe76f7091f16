"""The one scorer: a trained network's outputs for spectra, with any engine.

evaluate, learning-curve, discover and classify all score through this module, so one
spectrum gets one logit per engine wherever it is scored. Engines:

- ``torch``: eager PyTorch, fp32 (the reference).
- ``onnx``: the network exported to ONNX, run by onnxruntime in fp32 (same logits to ~1e-6).
- ``onnx-int8``: onnxruntime with int8 weights and uint8 activations (static QDQ). The
  activation ranges are measured on up to INT8_CALIBRATION_SPECTRA spectra spread evenly
  over all live rows of one store; which store and which rows are recorded
  (``Int8Calibration``) and written into every output scored with it. Quantising from the
  same store and rows gives the same model, so evaluate and discover agree.

No bf16 engine: torch with bf16 autocast scored 1.08x fp32 on this 2-core Xeon (bench/discover.py,
shared machine) and moved logits by up to 1e-2, while onnxruntime fp32 is ~3x and int8 ~7x eager
torch at the same accuracy (|ROC AUC change| <= 0.001).

A scorer maps a block of network inputs (B, C, n_bins) float32 to a dict of named float32
arrays of length B: ``{"logit": ...}`` today; further heads add further names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectransfer.errors import EvaluateError
from spectransfer.provenance import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx", "onnx-int8")
INT8_CALIBRATION_SPECTRA = 512  # spectra that set the int8 activation ranges
Outputs = dict[str, np.ndarray]
MC_SEED = 20211021  # the MC-dropout masks: one fixed sequence per batch
Scorer = Callable[[np.ndarray], Outputs]


def check_engine(engine: str) -> str:
    """``engine`` when it is one of ENGINES; else a one-line EvaluateError naming them."""
    if engine not in ENGINES:
        raise EvaluateError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def default_threads(workers: int | None = None) -> int:
    """Intra-op threads per scoring process: the cores this process may use, shared among ``workers``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers or 1))


# ---- ONNX export and int8 quantisation ---------------------------------------------------------


def export_onnx(model: Any, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``flux``, outputs ``logit`` and,
    for a network with a redshift head, ``z_logits``)."""
    import torch

    from spectransfer.ml.models import unwrap

    net = unwrap(model).eval()
    cfg = net.config
    path = Path(path)
    example = torch.zeros(2, cfg.in_channels, cfg.n_bins)
    heads = ["logit", "z_logits"] if cfg.has_z_head else ["logit"]
    if cfg.has_z_head:
        net = _BothHeads(net).eval()
    names = dict(input_names=["flux"], output_names=heads)
    dynamic = {"flux": {0: "batch"}, **{h: {0: "batch"} for h in heads}}
    with atomic_path(path) as tmp:
        try:
            # The TorchScript exporter takes seconds for this plain feed-forward net; the
            # torch.export one takes ~10x longer and gives the same graph.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (example,), tmp, dynamo=False, opset_version=opset, dynamic_axes=dynamic, **names)
        except Exception as exc:  # legacy exporter gone in a future torch
            log.info("TorchScript ONNX export unavailable (%s); using torch.export", exc)
            torch.onnx.export(net, (example,), tmp, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
    return path


def _BothHeads(net: Any) -> Any:
    """A module whose forward returns (logit, z_logits): what ONNX export traces for a z-head network."""
    import torch

    class BothHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net(x, with_z=True)

    return BothHeads()


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimisation, ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Int8Calibration:
    """Which spectra set the int8 activation ranges: enough to rebuild the same quantised model."""

    store_id: str | None
    store_name: str
    n_spectra: int
    rows_sha256: str
    rule: str = f"up to {INT8_CALIBRATION_SPECTRA} rows spread evenly over the store's live rows"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def header_cards(self) -> list[tuple[str, Any, str]]:
        """FITS cards (key, value, comment) describing the int8 calibration."""
        return [
            ("Q8STORE", str(self.store_id), "store of the int8 ranges"),
            ("Q8NSPEC", int(self.n_spectra), "spectra that set the int8 activation ranges"),
            ("Q8ROWSHA", self.rows_sha256[:16], "sha256 prefix of its rows used"),
        ]


def rows_digest(rows: np.ndarray) -> str:
    """sha256 of a row list (int64 bytes): names a selection of store rows exactly."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def int8_calibration_rows(store: Any, n: int = INT8_CALIBRATION_SPECTRA) -> np.ndarray:
    """``n`` rows spread evenly over all live rows of ``store`` (deterministic).

    Reads meta.parquet's ``row`` column only: ``store.rows()`` would load and keep the whole
    metadata table (~1.6 KB a spectrum, 15 GB at 9M) for the rest of a discover run."""
    rows = np.sort(np.asarray(store.live_rows(), dtype=np.int64))
    if rows.size <= n:
        return rows
    return np.unique(rows[np.linspace(0, rows.size - 1, n).round().astype(np.int64)])


def quantise_int8(model: Any, store: Any, target: str | Path) -> Int8Calibration:
    """Write the int8 ONNX model of ``model`` to ``target``, ranges set on ``store``'s spectra.

    Weights are int8 per channel, activations uint8 (QDQ format). The first convolution stays
    fp32: its input is the spectrum itself, and 256 levels of normalised flux wash out the
    lines (measured: ROC AUC -0.035 with it quantised, -0.001 without, on a simulated survey);
    so does the 1024 -> 1 output layer. Both are ~0.2% of the network's multiply-adds.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rows = int8_calibration_rows(store)
    if rows.size == 0:
        raise EvaluateError(f"{store.path}: no spectra to calibrate the int8 ranges on")
    calib = read_block(store, rows, model.config.in_channels)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"flux": calib[i : i + 64]} for i in range(0, calib.shape[0], 64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    target = Path(target)
    fp32 = target.with_name(target.stem + ".fp32.onnx")
    pre = target.with_name(target.stem + ".pre.onnx")
    try:
        export_onnx(model, fp32)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        nodes = onnx.load(str(pre)).graph.node
        convs = [n.name for n in nodes if n.op_type == "Conv"]
        # the output layer of each head stays fp32: the last dense node before each graph output
        outputs = {o.name for o in onnx.load(str(pre)).graph.output}
        producer = {out: n for n in nodes for out in n.output}
        dense = []
        for name in outputs:
            n = producer.get(name)
            while n is not None and n.op_type not in ("Gemm", "MatMul"):
                n = producer.get(n.input[0]) if n.input else None
            if n is not None:
                dense.append(n.name)
        with atomic_path(target) as tmp:
            quantize_static(
                str(pre),
                str(tmp),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                nodes_to_exclude=convs[:1] + dense,
            )
    finally:
        fp32.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    return Int8Calibration(
        store_id=(store.info or {}).get("store_id"),
        store_name=Path(store.path).name,
        n_spectra=int(rows.size),
        rows_sha256=rows_digest(rows),
    )


# ---- engines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """Everything a process needs to build the scorer: plain values, so it pickles for Dask."""

    run_dir: str
    engine: str
    onnx_path: str | None  # the prepared ONNX file of the onnx engines
    threads: int
    in_channels: int
    int8_calibration: Int8Calibration | None = None
    mc_samples: int = 0  # > 0: also P(QSO)'s spread over this many MC-dropout passes of the dense head
    temperature: float = 1.0  # the calibration the spread is measured in: sigmoid(logit / T)


def prepare_engine(
    run_dir: str | Path,
    engine: str,
    work_dir: str | Path,
    store: Any = None,
    model: Any = None,
    threads: int | None = None,
    mc_samples: int = 0,
    temperature: float | None = None,
) -> EngineSpec:
    """Export/quantise what ``engine`` runs into ``work_dir`` (reused when already there).

    ``store`` is needed for ``onnx-int8`` (its spectra set the int8 ranges); ``model`` saves
    loading the run again when the caller has it.
    """
    check_engine(engine)
    if model is None:
        from spectransfer.ml.models import load_run

        model, _info = load_run(run_dir)
    threads = int(threads) if threads else default_threads()
    if mc_samples < 0 or mc_samples == 1:
        raise EvaluateError(f"--mc-dropout must be 0 (off) or >= 2 passes, got {mc_samples}")
    base = dict(
        run_dir=str(Path(run_dir).resolve()),
        engine=engine,
        threads=threads,
        in_channels=int(model.config.in_channels),
        mc_samples=int(mc_samples),
        temperature=float(temperature) if temperature else 1.0,
    )
    if engine == "torch":
        return EngineSpec(onnx_path=None, **base)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / f"model-{engine}.onnx"
    if engine == "onnx":
        if not target.is_file():
            export_onnx(model, target)
        return EngineSpec(onnx_path=str(target.resolve()), **base)
    if store is None:
        raise EvaluateError("onnx-int8 needs a store whose spectra set the int8 ranges")
    record = work_dir / f"model-{engine}.json"
    calib: Int8Calibration | None = None
    want_store = (store.info or {}).get("store_id")
    if target.is_file() and record.is_file():
        old = Int8Calibration(**json.loads(record.read_text()))
        if old.store_id == want_store and old.rows_sha256 == rows_digest(int8_calibration_rows(store)):
            calib = old
    if calib is None:
        log.info("quantising the network to int8 on %s", store.path)
        calib = quantise_int8(model, store, target)
        write_text_atomic(record, json.dumps(calib.to_dict(), indent=2) + "\n")
    return EngineSpec(onnx_path=str(target.resolve()), int8_calibration=calib, **base)


def _named(out: Any) -> Outputs:
    """A network's output as named float32 arrays of length B (a bare tensor is the logit)."""
    if isinstance(out, Mapping):
        return {str(k): _as_column(v) for k, v in out.items()}
    return {"logit": _as_column(out)}


def _as_column(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().float().cpu().numpy()
    v = np.asarray(v, dtype=np.float32)
    return v[:, 0] if v.ndim == 2 and v.shape[1] == 1 else v


def with_redshift(out: Outputs) -> Outputs:
    """Turn a redshift head's logits (B, z_bins) into the network's ``z_net``, ``z_net_err`` and
    ``z_net_prob`` (B,; the head's probability that z_net is within 3000 km/s of the truth):
    every engine hands the same named columns on, and no caller carries 300 numbers per spectrum."""
    z_logits = out.pop("z_logits", None)
    if z_logits is not None:
        from spectransfer.ml.models import redshift_from_head, redshift_probability

        z, z_err = redshift_from_head(z_logits)
        out["z_net"] = z.astype(np.float32)
        out["z_net_err"] = z_err.astype(np.float32)
        out["z_net_prob"] = redshift_probability(z_logits, z).astype(np.float32)
    return out


def build_scorer(spec: EngineSpec, model: Any = None) -> Scorer:
    """A function: input (B, C, n_bins) float32 -> {"logit": (B,) float32, ...} for ``spec.engine``
    (plus ``p_qso_std`` when ``spec.mc_samples`` asks for MC dropout)."""
    scorer = _engine_scorer(spec, model)
    if spec.mc_samples <= 0:
        return scorer
    spread = mc_dropout_scorer(spec, model)

    def with_spread(x: np.ndarray) -> Outputs:
        return {**scorer(x), "p_qso_std": spread(x)}

    return with_spread


def mc_dropout_scorer(spec: EngineSpec, model: Any = None) -> Callable[[np.ndarray], np.ndarray]:
    """Std of sigmoid(logit / T) over ``spec.mc_samples`` passes with the dense head's dropout on
    (Gal & Ghahramani 2016): the trunk runs once, only the head is sampled. The dropout masks
    come from a fixed seed per batch, so the same batches give the same spreads."""
    import torch

    from spectransfer.ml.models import load_run, unwrap

    net = unwrap(model if model is not None else load_run(spec.run_dir)[0])
    drops = [m for m in net.head.modules() if isinstance(m, torch.nn.Dropout)]

    def spread(x: np.ndarray) -> np.ndarray:
        was = net.training
        net.eval()
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(MC_SEED)
                feats = net.features(torch.from_numpy(np.ascontiguousarray(x)))
                for m in drops:
                    m.train()
                logits = torch.stack([net.head(feats).squeeze(-1) for _ in range(spec.mc_samples)])
                p = torch.sigmoid(logits / spec.temperature)
                return p.std(dim=0).float().numpy()
        finally:
            for m in drops:
                m.eval()
            net.train(was)

    return spread


def _engine_scorer(spec: EngineSpec, model: Any = None) -> Scorer:
    if spec.engine == "torch":
        import torch

        torch.set_num_threads(spec.threads)
        if model is None:
            from spectransfer.ml.models import load_run

            model, _info = load_run(spec.run_dir)
        from spectransfer.ml.models import unwrap

        net = unwrap(model)

        def run_torch(x: np.ndarray) -> Outputs:
            was_training = net.training
            net.eval()
            try:
                with torch.inference_mode():
                    logit, z_logits = net(torch.from_numpy(np.ascontiguousarray(x)), with_z=True)
                    heads = {"logit": logit} if z_logits is None else {"logit": logit, "z_logits": z_logits}
                    return with_redshift(_named(heads))
            finally:
                net.train(was_training)

        return run_torch
    if spec.engine in ("onnx", "onnx-int8"):
        if spec.onnx_path is None or not Path(spec.onnx_path).is_file():
            raise EvaluateError(f"engine {spec.engine}: prepared ONNX file {spec.onnx_path} is missing")
        session = onnx_session(spec.onnx_path, spec.threads)
        name = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]

        def run_onnx(x: np.ndarray) -> Outputs:
            got = session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})
            return with_redshift({k: _as_column(v) for k, v in zip(outputs, got)})

        return run_onnx
    raise EvaluateError(f"--engine must be one of {', '.join(ENGINES)}, got {spec.engine!r}")


# ---- reading the store and scoring rows ----------------------------------------------------------


def read_block(store: Any, rows: np.ndarray, in_channels: int = 1) -> np.ndarray:
    """Network input (len(rows), in_channels, n_bins) float32 for sorted ``rows``, one read per chunk."""
    return _read_rows(store.flux, store.ivar if in_channels == 2 else None, rows, in_channels)


def _read_rows(flux: Any, ivar: Any, rows: np.ndarray, in_channels: int) -> np.ndarray:
    # ``flux``/``ivar`` are the opened zarr arrays: opening them costs far more than a chunk read.
    from spectransfer.ml.dataset import make_input

    f, iv = read_arrays(flux, ivar if in_channels == 2 else None, rows)
    return np.ascontiguousarray(make_input(f, iv, in_channels))


def read_arrays(flux: Any, ivar: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The store's flux (and ivar, when given) of sorted ``rows``, one read per chunk."""
    rows = np.asarray(rows, dtype=np.int64)
    chunk = int(flux.chunks[0])
    fs: list[np.ndarray] = []
    ivs: list[np.ndarray] = []
    for c in np.unique(rows // chunk):
        sel = rows[(rows >= c * chunk) & (rows < (c + 1) * chunk)]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        fs.append(np.asarray(flux[lo:hi])[sel - lo])
        if ivar is not None:
            ivs.append(np.asarray(ivar[lo:hi])[sel - lo])
    n_bins = int(flux.shape[1])
    f = np.concatenate(fs) if fs else np.zeros((0, n_bins), np.float32)
    if ivar is None:
        return f, None
    return f, (np.concatenate(ivs) if ivs else np.zeros((0, n_bins), np.float32))


def _spans(store: Any, rows: np.ndarray, span: int, in_channels: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, input block) per ``span`` rows; the next block is read in a thread while the
    caller scores the current one (zarr decompression releases the GIL)."""
    flux = store.flux
    ivar = store.ivar if in_channels == 2 else None
    starts = list(range(0, rows.size, span))
    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-reader") as pool:
        pending = pool.submit(_read_rows, flux, ivar, rows[:span], in_channels)
        for k, a in enumerate(starts):
            x = pending.result()
            if k + 1 < len(starts):
                b = starts[k + 1]
                pending = pool.submit(_read_rows, flux, ivar, rows[b : b + span], in_channels)
            yield a, x


def score_rows(
    scorer: Scorer, store: Any, rows: np.ndarray, batch_size: int = 1024, in_channels: int = 1, progress: Any = None
) -> Outputs:
    """Named outputs for sorted ``rows`` of ``store``: read a span of chunks at a time, run in batches."""
    rows = np.asarray(rows, dtype=np.int64)
    out: Outputs = {}
    span = max(batch_size, int(store.flux.chunks[0]))
    for a, x in _spans(store, rows, span, in_channels):
        for b in range(0, x.shape[0], batch_size):
            got = scorer(x[b : b + batch_size])
            for k, v in got.items():
                if k not in out:
                    out[k] = np.empty((rows.size, *v.shape[1:]), dtype=np.float32)
                out[k][a + b : a + b + v.shape[0]] = v
            if progress is not None:
                progress.advance(min(batch_size, x.shape[0] - b))
    if not out:
        out["logit"] = np.empty(0, np.float32)
    return out


def score_array(scorer: Scorer, x: np.ndarray, batch_size: int = 1024) -> Outputs:
    """Named outputs for network inputs already in memory (classify: files, no store)."""
    parts = [scorer(x[b : b + batch_size]) for b in range(0, x.shape[0], batch_size)]
    if not parts:
        return {"logit": np.empty(0, np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def score_store(
    run_or_model: Any,
    store: Any,
    rows: np.ndarray | None = None,
    batch_size: int = 1024,
    engine: str = "torch",
    threads: int | None = None,
    progress: Any = None,
    work_dir: str | Path | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Float32 logits of ``rows`` of ``store`` (all live rows when None), in the given order.

    ``run_or_model`` is a run folder or a network; ``store`` a Store or its path. ``work_dir``
    keeps the prepared ONNX model between calls (a temporary folder when None).
    ``num_workers`` is accepted for callers of the former API and ignored.
    """
    return score_store_outputs(run_or_model, store, rows, batch_size, engine, threads, progress, work_dir)["logit"]


def score_store_outputs(
    run_or_model: Any,
    store: Any,
    rows: np.ndarray | None = None,
    batch_size: int = 1024,
    engine: str = "torch",
    threads: int | None = None,
    progress: Any = None,
    work_dir: str | Path | None = None,
) -> Outputs:
    """Like ``score_store`` but every named output (logit, and any further head)."""
    from spectransfer.data.store import Store, open_store
    from spectransfer.ml.models import VGG1D, load_run, unwrap

    check_engine(engine)
    if not isinstance(store, Store):
        store = open_store(store)
    run_dir = Path(".")
    if hasattr(run_or_model, "forward"):
        model = unwrap(run_or_model)
    else:
        run_dir = Path(run_or_model)
        model, info = load_run(run_dir)
        if info.grid != store.grid:
            raise EvaluateError(f"{run_dir}: model grid {info.grid.to_dict()} differs from the store's {store.grid.to_dict()}")
    if not isinstance(model, VGG1D):
        raise EvaluateError("score_store needs a spectransfer VGG1D network")
    if model.config.n_bins != store.grid.n_bins:
        raise EvaluateError(f"model expects {model.config.n_bins} bins, the store has {store.grid.n_bins}")
    rows = store.rows() if rows is None else rows
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= store.n_rows):
        raise EvaluateError(f"rows out of range for {store.path} ({store.n_rows} rows)")
    uniq = np.unique(rows)
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare_engine(run_dir, engine, work_dir or tmp, store=store, model=model, threads=threads)
        scorer = build_scorer(spec, model=model)
        got = score_rows(scorer, store, uniq, batch_size, spec.in_channels, progress)
    where = np.searchsorted(uniq, rows)
    return {k: v[where] for k, v in got.items()}
