"""Score store rows with a trained network, chunk by chunk, in eager torch or onnxruntime.

Discovery scores every spectrum of a survey (millions); ``score_store`` streams the rows
through the same ``ChunkStream`` that training uses (no shuffling) so memory stays bounded,
and returns one float32 logit per requested row, in the order the rows were given.
``engine="onnx"`` exports the network to ONNX once and runs it with onnxruntime, which is
several times faster than eager torch on a CPU (see bench/train.py).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectransfer.provenance import atomic_path
from spectransfer.ml.dataset import ChunkStream, Selection
from spectransfer.errors import EvaluateError
from spectransfer.ml.models import VGG1D, unwrap, load_run

log = logging.getLogger(__name__)


def export_onnx(model: torch.nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``flux``, output ``logit``)."""
    net = unwrap(model).eval()
    cfg = net.config
    path = Path(path)
    example = torch.zeros(2, cfg.in_channels, cfg.n_bins)
    names = dict(input_names=["flux"], output_names=["logit"])
    with atomic_path(path) as tmp:
        try:
            # The TorchScript exporter takes seconds for this plain feed-forward net; the
            # torch.export one takes ~10x longer and gives the same graph.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (example,), tmp, dynamo=False, opset_version=opset,
                                  dynamic_axes={"flux": {0: "batch"}, "logit": {0: "batch"}}, **names)
        except Exception as exc:  # legacy exporter gone in a future torch
            log.info("TorchScript ONNX export unavailable (%s); using torch.export", exc)
            torch.onnx.export(net, (example,), tmp, dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
    return path


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def score_store(
    run_or_model: str | Path | torch.nn.Module,
    store: Any,
    rows: np.ndarray | None = None,
    batch_size: int = 1024,
    engine: str = "torch",
    num_workers: int = 0,
    threads: int | None = None,
    progress: Any = None,
) -> np.ndarray:
    """Float32 logits of ``rows`` of ``store`` (all live rows when None), in the given order.

    ``run_or_model`` is a run folder or a network; ``store`` a Store or its path. ``progress``
    is an optional object with ``advance(n)`` (a ``progress_bar``) told of every batch.
    """
    from spectransfer.data.store import Store, open_store

    if engine not in ("torch", "onnx"):
        raise EvaluateError(f"engine must be torch or onnx, got {engine!r}")
    if not isinstance(store, Store):
        store = open_store(store)
    if isinstance(run_or_model, torch.nn.Module):
        model = unwrap(run_or_model)
    else:
        model, info = load_run(run_or_model)
        if info.grid != store.grid:
            raise EvaluateError(f"{run_or_model}: model grid {info.grid.to_dict()} differs from the store's {store.grid.to_dict()}")
    if not isinstance(model, VGG1D):
        raise EvaluateError("score_store needs a spectransfer VGG1D network")
    if model.config.n_bins != store.grid.n_bins:
        raise EvaluateError(f"model expects {model.config.n_bins} bins, the store has {store.grid.n_bins}")
    if rows is None:
        rows = store.rows()
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= store.n_rows):
        raise EvaluateError(f"rows out of range for {store.path} ({store.n_rows} rows)")
    uniq = np.unique(rows)
    sel = Selection(uniq, np.zeros(uniq.size, np.float32))
    stream = ChunkStream(store.flux, sel, ivar=store.ivar, in_channels=model.config.in_channels,
                         batch_size=batch_size, shuffle=False)
    out = np.empty(uniq.size, dtype=np.float32)
    if uniq.size == 0:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if engine == "onnx":
            session = onnx_session(export_onnx(model, Path(tmp) / "model.onnx"), threads)

            def run(x: torch.Tensor) -> np.ndarray:
                return session.run(None, {"flux": x.numpy()})[0]
        else:
            was_training = model.training
            model.eval()

            def run(x: torch.Tensor) -> np.ndarray:
                with torch.inference_mode():
                    return model(x).float().numpy()

        for x, _, r in stream.loader(num_workers, generator=torch.Generator()):
            out[np.searchsorted(uniq, r.numpy())] = run(x)
            if progress is not None:
                progress.advance(len(r))
        if engine == "torch" and was_training:
            model.train()
    return out[np.searchsorted(uniq, rows)]
