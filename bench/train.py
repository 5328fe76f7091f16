"""Benchmark training and scoring throughput of VGG-A on this machine.

Figures (spectra per second, all measured in this run on the same model):
- train_fp32_memory: full training step (forward, BCE, backward, Adam) on tensors in RAM;
- train_fp32_store: the same step fed from a store by the streaming DataLoader;
  pipeline_ratio = store / memory (target >= 0.9: the input pipeline is not the bottleneck);
- train_bf16_memory: the step under torch.amp bf16 autocast; bf16_speedup = bf16 / fp32;
- infer_eager, infer_onnx: scoring in eager torch (inference_mode) and in onnxruntime after
  ONNX export (graph optimisation ALL, 2 intra-op threads), each at batches of 256 and
  1024 spectra; onnx_speedup = best onnx / best eager (target >= 2).
- with --device cuda (or auto where torch sees a GPU): the same step, batch and model on the
  GPU: cuda_fp32_device (batch resident on the GPU), cuda_bf16_device (bf16 autocast),
  cuda_fp32_store (fed from the same store by the DataLoader, copied per step), and the ratios
  of each to the CPU's train_fp32_memory measured above in the same run.
Last line: one JSON object with the figures. Usage: python bench/train.py [--steps N] [--device cpu|cuda|auto]
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
from spectransfer.ml.train import native_bf16_cpu

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


def train_rate(
    model: torch.nn.Module, batches, steps: int, bf16: bool = False, device: torch.device | None = None, warmup: int = 1
) -> float:
    """Spectra/s of ``steps`` training steps on ``device`` (default CPU) after ``warmup`` steps."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    it = iter(batches)
    t0 = None
    n = 0
    for i in range(steps + warmup):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        x, y = next(it)[:2]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            n += len(y)
    if cuda:
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def epochs(stream: ChunkStream, workers: int, pin: bool):
    """The stream's batches pass after pass (a small store feeds any number of steps); the
    workers persist, so that starting them is not timed again at every pass."""
    loader = stream.loader(workers, generator=torch.Generator(), pin_memory=pin, persistent_workers=workers > 0)
    while True:
        yield from loader


def cuda_rates(
    store: object, sel: object, x_mem: torch.Tensor, y_mem: torch.Tensor, steps: int, workers: int, device: str = "cuda"
) -> dict:
    """Training spectra/s on the GPU: the bench's model, batch and store, fp32 and bf16
    (``device`` cpu runs the same code on the CPU, to test it where there is no GPU)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig()).to(dev)
    xg, yg = x_mem.to(dev), y_mem.to(dev)
    resident = iter(lambda: (xg, yg), None)
    warm = 5  # cuDNN picks its algorithms in the first steps
    out = {
        "cuda_fp32_device": train_rate(model, resident, steps, device=dev, warmup=warm),
        "cuda_bf16_device": train_rate(model, resident, steps, bf16=True, device=dev, warmup=warm),
    }
    stream = ChunkStream(store.flux, sel, batch_size=BATCH, seed=0)
    out["cuda_fp32_store"] = train_rate(model, epochs(stream, workers, True), steps, device=dev, warmup=warm)
    x4, y4 = torch.randn(1024, 1, x_mem.shape[-1], device=dev), (torch.rand(1024, device=dev) < 0.2).float()
    out["gpu_train_bf16"] = train_rate(model, iter(lambda: (x4, y4), None), steps, bf16=True, device=dev, warmup=warm)
    return out


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
    ap.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="also measure on the GPU (auto: when torch sees one)"
    )
    ap.add_argument("--cuda-steps", type=int, default=50, help="timed training steps per GPU measurement")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA device here")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    threads = torch.get_num_threads()
    native_bf16 = native_bf16_cpu()
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
        if use_cuda:  # same model, batch and store as the CPU figures above
            rates = cuda_rates(store, sel, x_mem, y_mem, args.cuda_steps, args.workers)
            name = torch.cuda.get_device_name()
            for key in ("cuda_fp32_device", "cuda_bf16_device", "cuda_fp32_store"):
                gpu[key] = round(rates[key], 1)
                gpu[key.replace("cuda_", "cuda_ratio_")] = round(rates[key] / memory, 2)
            gpu["gpu_train_bf16"] = round(rates["gpu_train_bf16"], 1)
            gpu["gpu_epoch_4M_s"] = round(4e6 / rates["gpu_train_bf16"], 1)
            gpu["gpu"] = name
            print(f"GPU {name}, batch {BATCH}, ratios against the CPU fp32 in RAM above ({memory:.1f} spectra/s):")
            print(
                f"  cuda fp32, batch on the GPU:   {rates['cuda_fp32_device']:9.1f} spectra/s ({gpu['cuda_ratio_fp32_device']}x CPU)"
            )
            print(
                f"  cuda bf16 autocast, on GPU:    {rates['cuda_bf16_device']:9.1f} spectra/s ({gpu['cuda_ratio_bf16_device']}x CPU)"
            )
            print(
                f"  cuda fp32, streamed from store:{rates['cuda_fp32_store']:9.1f} spectra/s ({gpu['cuda_ratio_fp32_store']}x CPU; "
                f"{args.workers} DataLoader worker(s))"
            )
            print(
                f"  cuda bf16, batch 1024 on GPU:  {rates['gpu_train_bf16']:9.1f} spectra/s, 4M-spectrum epoch {gpu['gpu_epoch_4M_s']:.0f} s"
            )
        else:
            print("no cuda: GPU figures not measured")

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
