"""Benchmark training and scoring throughput of VGG-A on this machine.

Figures (spectra per second, all measured in this run on the same model):
- train_fp32_memory: full training step (forward, BCE, backward, Adam) on tensors in RAM;
- train_fp32_store: the same step fed from a store by the streaming DataLoader;
  pipeline_ratio = store / memory (target >= 0.9: the input pipeline is not the bottleneck);
- train_bf16_memory: the step under torch.amp bf16 autocast; bf16_speedup = bf16 / fp32;
- infer_eager, infer_onnx: scoring in eager torch (inference_mode) and in onnxruntime after
  ONNX export (graph optimisation ALL, 2 intra-op threads), each at batches of 256 and
  1024 spectra; onnx_speedup = best onnx / best eager (target >= 2).
Last line: one JSON object with the figures. Usage: python bench/train.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spectransfer.data.store import write_store
from spectransfer.ml.dataset import ChunkStream, select
from spectransfer.ml.models import ModelConfig, build_model
from spectransfer.ml.score import export_onnx, onnx_session

BATCH = 256


def make_store(path: Path, n: int) -> object:
    rng = np.random.default_rng(0)
    flux = np.clip(rng.normal(0, 0.3, (n, 2048)), -1, 1).astype(np.float32)
    ivar = rng.uniform(0.5, 2, (n, 2048)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "survey": "sdss",
            "label": (rng.random(n) < 0.2).astype(np.int8),
            "split": "train",
            "object_id": [f"o{i}" for i in range(n)],
            "spectrum_id": [f"s{i}" for i in range(n)],
        }
    )
    return write_store(path, flux, ivar, meta)


def train_rate(model: torch.nn.Module, batches, steps: int, bf16: bool = False) -> float:
    """Spectra/s of ``steps`` training steps after one warm-up step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    it = iter(batches)
    t0 = None
    n = 0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        x, y = next(it)[:2]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 1:
            n += len(y)
    return n / (time.perf_counter() - t0)


def infer_rate(run, x: np.ndarray, batch: int, n: int) -> float:
    """Spectra/s scoring ``n`` spectra from ``x`` in batches of ``batch`` (after a warm-up)."""
    run(x[:batch])
    t = time.perf_counter()
    done = 0
    while done < n:
        for i in range(0, len(x), batch):
            run(x[i : i + batch])
            done += len(x[i : i + batch])
    return done / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per measurement")
    ap.add_argument("--bf16-steps", type=int, default=2, help="timed bf16 training steps")
    ap.add_argument("--bf16-batch", type=int, default=64, help="batch of the bf16 measurement (emulated bf16 is slow)")
    ap.add_argument("--infer", type=int, default=2048, help="spectra scored per inference measurement")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for the store-fed run")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    print(
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} cores; batch {BATCH}; "
        f"native bf16 instructions: {'yes' if native_bf16 else 'no (bf16 autocast is emulated)'}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        n_rows = BATCH * (args.steps + 2)
        store = make_store(Path(tmp) / "store", n_rows)
        sel = select(store, split="train")
        torch.manual_seed(0)
        model = build_model(ModelConfig())

        x_mem = torch.from_numpy(np.asarray(store.flux[:BATCH]))[:, None, :]
        y_mem = torch.from_numpy(sel.labels[:BATCH])
        forever = iter(lambda: (x_mem, y_mem), None)

        memory = train_rate(model, forever, args.steps)
        print(f"train fp32, tensors in RAM:      {memory:8.1f} spectra/s")
        stream = ChunkStream(store.flux, sel, batch_size=BATCH, seed=0)
        loader = stream.loader(args.workers, generator=torch.Generator())
        fed = train_rate(model, loader, args.steps)
        print(f"train fp32, streamed from store: {fed:8.1f} spectra/s ({args.workers} DataLoader worker(s))")
        # measure the in-memory reference again and average: load drifts on a shared machine
        memory = 0.5 * (memory + train_rate(model, forever, args.steps))
        print(f"train fp32, tensors in RAM (mean of before and after): {memory:8.1f} spectra/s")
        # bf16 autocast is emulated (slow) on CPUs without AVX512-BF16/AMX: time fewer steps
        x16, y16 = x_mem[: args.bf16_batch], y_mem[: args.bf16_batch]
        bf16 = train_rate(model, iter(lambda: (x16, y16), None), args.bf16_steps, bf16=True)
        print(f"train bf16 autocast, in RAM:     {bf16:8.1f} spectra/s (batch {args.bf16_batch})")

        model.eval()
        x_inf = torch.from_numpy(np.asarray(store.flux[: min(1024, n_rows)]))[:, None, :]
        xn = x_inf.numpy()
        t = time.perf_counter()
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - t
        session = onnx_session(onnx_path, threads=2)

        def eager_run(a: np.ndarray) -> None:
            with torch.inference_mode():
                model(torch.from_numpy(a))

        def onnx_run(a: np.ndarray) -> None:
            session.run(None, {"flux": a})

        # each engine at batches of 256 and 1024 spectra; the ratio takes each at its best
        eager_by_batch, onnx_by_batch = {}, {}
        for bs in (256, 1024):
            eager_by_batch[bs] = infer_rate(eager_run, xn, bs, args.infer)
            onnx_by_batch[bs] = infer_rate(onnx_run, xn, bs, args.infer)
            print(
                f"inference batch {bs:4d}: eager torch {eager_by_batch[bs]:7.1f}, onnxruntime {onnx_by_batch[bs]:7.1f} spectra/s"
            )
        eager, onnx = max(eager_by_batch.values()), max(onnx_by_batch.values())
        print(f"ONNX export took {export_s:.1f} s")

    gpu = {}
    if torch.cuda.is_available():  # data resident on the GPU: the compute ceiling of an epoch
        dev = torch.device("cuda")
        torch.manual_seed(0)
        gmodel = build_model(ModelConfig()).to(dev)
        xg = torch.randn(1024, 1, 2048, device=dev)
        yg = (torch.rand(1024, device=dev) < 0.2).float()
        opt = torch.optim.Adam(gmodel.parameters(), lr=1e-3)
        for i in range(25):
            if i == 5:
                torch.cuda.synchronize()
                t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(gmodel(xg).float(), yg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        rate = 20 * 1024 / (time.perf_counter() - t)
        gpu = {"gpu_train_bf16": round(rate, 1), "gpu_epoch_4M_s": round(4e6 / rate, 1), "gpu": torch.cuda.get_device_name()}
        print(f"GPU {gpu['gpu']}: bf16 training {rate:.0f} spectra/s (batch 1024), 4M-spectrum epoch {4e6 / rate:.0f} s")

    figures = {
        "train_fp32_memory": round(memory, 1),
        "train_fp32_store": round(fed, 1),
        "pipeline_ratio": round(fed / memory, 3),
        "train_bf16_memory": round(bf16, 1),
        "bf16_speedup": round(bf16 / memory, 2),
        "infer_eager": round(eager, 1),
        "infer_eager_by_batch": {str(k): round(v, 1) for k, v in eager_by_batch.items()},
        "infer_onnx_by_batch": {str(k): round(v, 1) for k, v in onnx_by_batch.items()},
        "infer_onnx": round(onnx, 1),
        "onnx_speedup": round(onnx / eager, 2),
        "threads": threads,
        "native_bf16": native_bf16,
        **gpu,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
