"""One short check of spectransfer on a GPU machine: environment, ingest, training and
discovery throughput on CUDA against the same machine's CPU, and multi-process DDP.

Made for a lent machine with little device time (bench/gpu_check.sh installs the carried
wheels and runs this). Every step runs in a subprocess under its own timeout, so one failing
step costs its own time only; the next step still runs. CUDA parts print "no cuda" and are
skipped where torch sees no GPU. Ratios are against the CPU measured in the same run on the
same machine. Human lines go to stdout; OUT/gpu_check.json holds every figure (rewritten after
each step) and the last stdout line is the same JSON object.

    OUT=/tmp/out python bench/gpu_check.py [--n 4000] [--tiny] [--budget 400]

GPU_CHECK_TINY=1 (or --tiny) shrinks every size so that the whole check runs in minutes on a
small CPU machine (for testing this script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS: dict[str, object] = {}
SUMMARY: list[str] = []
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def result(msg: str) -> None:
    """A RESULT line: printed now and again in the summary at the end."""
    SUMMARY.append(msg)
    print(msg, flush=True)


def save(out: Path) -> None:
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    tmp.replace(out / "gpu_check.json")


def sh(name: str, cmd: list[str], timeout: float, log: Path | None = None, env: dict | None = None) -> tuple[int, str, float]:
    """Run ``cmd`` with a timeout; its output goes to stdout (and ``log``). Returns rc, output, seconds."""
    say(f"{name}: $ {shlex.join(cmd)}  (timeout {timeout:.0f} s)")
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        text += f"\nTIMEOUT after {timeout:.0f} s"
    except OSError as exc:
        rc, text = 127, f"could not start: {exc}"
    sec = time.perf_counter() - t
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"### {name}: {shlex.join(cmd)}\n{text}\n### rc {rc}, {sec:.1f} s\n")
    lines = text.rstrip().splitlines()
    shown = lines if len(lines) <= 40 else lines[:5] + [f"... ({len(lines) - 35} lines, full text in the log) ..."] + lines[-30:]
    for line in shown:
        print(f"    {line}")
    say(f"{name}: rc {rc} in {sec:.1f} s" + ("" if rc == 0 else "  <-- FAILED"))
    return rc, text, sec


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


PY = sys.executable
CLI = [PY, "-m", "spectransfer"]


def step_env(out: Path) -> bool:
    """a: the machine, the versions, and `import spectransfer.cli` (without torch)."""
    sh("nvidia-smi", ["nvidia-smi"], 30, out / "gpu_check_env.log")
    rc, text, _ = sh("lscpu", ["lscpu"], 15, out / "gpu_check_env.log")
    cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name:")), "unknown")
    RESULTS["cpu_model"] = cpu
    RESULTS["cpu_count"] = os.cpu_count()
    probe = (
        "import importlib, importlib.metadata as md, json, sys, torch\n"
        "c = torch.cuda.is_available()\n"
        "v = {'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda_available': c, 'cuda_version': torch.version.cuda,"
        " 'gpu_count': torch.cuda.device_count(), 'gpu_name': torch.cuda.get_device_name(0) if c else None}\n"
        "for m in ('numpy', 'pandas', 'pyarrow', 'onnxruntime', 'typing_extensions', 'astropy', 'zarr', 'dask', 'distributed', 'fastapi'):\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "        v[m] = md.version(m)\n"
        "    except Exception as exc:\n"
        "        v[m] = f'IMPORT FAILED: {exc}'\n"
        "print(json.dumps(v))"
    )
    rc, text, _ = sh("versions", [PY, "-c", probe], 120, out / "gpu_check_env.log")
    info = last_json(text) or {}
    RESULTS["env"] = info
    rc, text, _ = sh(
        "import spectransfer.cli",
        [PY, "-c", "import sys, spectransfer.cli; print('torch imported:', 'torch' in sys.modules)"],
        60,
        out / "gpu_check_env.log",
    )
    RESULTS["import_cli_ok"] = rc == 0
    RESULTS["import_cli_pulls_torch"] = "torch imported: True" in text
    result(
        f"RESULT a: CPU {cpu}, {os.cpu_count()} cores; GPU {info.get('gpu_name') or 'no cuda'}; torch {info.get('torch')}; "
        f"import spectransfer.cli {'ok' if rc == 0 else 'FAILED'}"
    )
    return bool(info.get("cuda_available"))


def step_data(out: Path, work: Path, n: int, workers: int) -> Path | None:
    """b: simulate an SDSS-like survey and ingest it."""
    sim, store = work / "sdss", work / "store"
    cmd = [*CLI, *f"simulate --survey sdss --n {n} --seed 11 --workers {workers} --quiet --out".split(), str(sim)]
    rc, _, sec = sh("simulate", cmd, 180, out / "gpu_check_steps.log")
    RESULTS["simulate"] = {"rc": rc, "n": n, "seconds": round(sec, 1), "files_per_s": round(n / sec, 1)}
    if rc:
        return None
    from spectransfer.simulate import CATALOG_NAME

    cat_args = ["--catalog", str(sim / CATALOG_NAME["sdss"])]
    cmd = [
        *CLI,
        "ingest",
        str(sim / "spectra"),
        "--store",
        str(store),
        *cat_args,
        *f"--survey sdss --workers {workers} --quiet".split(),
    ]
    rc, _, sec = sh("ingest", cmd, 240, out / "gpu_check_steps.log")
    RESULTS["ingest"] = {"rc": rc, "n": n, "workers": workers, "seconds": round(sec, 1), "spectra_per_s": round(n / sec, 1)}
    result(
        f"RESULT b: simulate {n} files {RESULTS['simulate']['seconds']} s; ingest --workers {workers} {sec:.1f} s "
        f"({n / sec:.0f} spectra/s, process start included) rc {rc}"
    )
    return store if rc == 0 else None


def train_args(store: Path, run: Path, steps: int, batch: int, device: str, devices: int) -> list[str]:
    opts = f"--max-steps {steps} --batch-size {batch} --eval-every {steps} --devices {devices} --device {device}"
    return [
        *CLI,
        "train",
        "--store",
        str(store),
        "--out",
        str(run),
        *opts.split(),
        *"--workers 0 --seed 3 --debug-rows --quiet".split(),
    ]


def ddp_verdict(run: Path, ranks: int) -> tuple[bool, str]:
    """Same number of steps on every rank, disjoint rows within each epoch (a later epoch
    reshuffles the windows over the ranks), identical final weights."""
    import torch
    from safetensors.torch import load_file

    try:
        rows = []
        for r in range(ranks):
            lines = (run / "debug" / f"rows-rank{r}.txt").read_text().splitlines()
            rows.append((len(lines), {(ln.split()[0], int(x)) for ln in lines for x in ln.split()[2:]}))
        weights = [load_file(str(run / "debug" / f"final-rank{r}.safetensors")) for r in range(ranks)]
    except (OSError, ValueError) as exc:
        return False, f"debug files unreadable: {exc}"
    same_steps = len({k for k, _ in rows}) == 1
    disjoint = all(not (rows[i][1] & rows[j][1]) for i in range(ranks) for j in range(i + 1, ranks))
    diff = max(float((weights[0][k].float() - w[k].float()).abs().max()) for w in weights[1:] for k in weights[0])
    identical = all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    ok = same_steps and disjoint and identical
    return ok, (
        f"steps per rank {[k for k, _ in rows]}, rows disjoint {disjoint}, weights identical {identical} (max |dw| {diff:.2e})"
    )


def step_train_runs(out: Path, work: Path, store: Path, cuda: bool, steps: int, batch: int) -> Path | None:
    """e: `spectransfer train` on CPU, on one GPU, and 2-process DDP with gloo on CPU processes."""
    log = out / "gpu_check_train.log"
    res: dict[str, object] = {"steps": steps, "batch": batch}
    run_cpu = work / "run-cpu"
    rc, _, sec_cpu = sh("train cpu", train_args(store, run_cpu, steps, batch, "cpu", 1), 200, log)
    res["cpu"] = {"rc": rc, "seconds": round(sec_cpu, 1)}
    best = run_cpu if rc == 0 else None
    if cuda:
        run_gpu = work / "run-cuda"
        rc, _, sec_gpu = sh("train cuda", train_args(store, run_gpu, steps, batch, "cuda", 1), 200, log)
        res["cuda"] = {"rc": rc, "seconds": round(sec_gpu, 1)}
        if rc == 0:
            best = run_gpu
            res["cuda_vs_cpu_wall"] = round(sec_cpu / sec_gpu, 2)
        result(
            f"RESULT e1: train {steps} steps batch {batch} (process start, evaluation and saving included): "
            f"cpu {sec_cpu:.1f} s, cuda {sec_gpu:.1f} s ({sec_cpu / sec_gpu:.2f}x) rc {rc}"
        )
    else:
        result(f"RESULT e1: train {steps} steps batch {batch} on cpu {sec_cpu:.1f} s; no cuda: single-GPU run skipped")
    run_ddp = work / "run-ddp-gloo"
    rc, _, sec = sh("train ddp 2 cpu procs (gloo)", train_args(store, run_ddp, steps, batch // 2, "cpu", 2), 240, log)
    ok, why = ddp_verdict(run_ddp, 2) if rc == 0 else (False, f"train exited {rc}")
    if rc and int(RESULTS.get("n") or 0) < 2100:  # 256-row chunks read 4 at a time: fewer than 8 chunks leave a rank none
        why += " (expected below --n 2100: one rank gets no batch; see gpu_check_train.log)"
    res["ddp_gloo_cpu"] = {"rc": rc, "seconds": round(sec, 1), "pass": ok, "detail": why}
    result(f"RESULT e2: DDP --devices 2 --device cpu (gloo): {'PASS' if ok else 'FAIL'}: {why}")
    gpus = int((RESULTS.get("env") or {}).get("gpu_count") or 0)
    if gpus >= 2:
        run_nccl = work / "run-ddp-nccl"
        rc, _, sec = sh("train ddp 2 gpus (nccl)", train_args(store, run_nccl, steps, batch // 2, "cuda", 2), 240, log)
        ok, why = ddp_verdict(run_nccl, 2) if rc == 0 else (False, f"train exited {rc}")
        res["ddp_nccl_cuda"] = {"rc": rc, "seconds": round(sec, 1), "pass": ok, "detail": why}
        result(f"RESULT e3: DDP --devices 2 --device cuda (nccl): {'PASS' if ok else 'FAIL'}: {why}")
    else:
        why = (
            f"{gpus} GPU(s): NCCL cannot run two ranks on one GPU, and train puts rank r on cuda:r with nccl "
            "whenever --device cuda, so 2 ranks on one GPU (gloo) is not a path the code offers; not run"
        )
        res["ddp_cuda"] = {"pass": None, "detail": why}
        result(f"RESULT e3: DDP on GPUs: SKIPPED: {why}")
    RESULTS["train_runs"] = res
    return best


def step_bench_train(out: Path, cuda: bool, tiny: bool) -> None:
    """c: bench/train.py: the same model, batch and store on CPU and on cuda (fp32, bf16)."""
    if tiny:
        opts = "--steps 1 --bf16-steps 1 --infer 256 --cuda-steps 2 --workers 1"
    else:
        opts = "--steps 6 --bf16-steps 3 --bf16-batch 256 --infer 4096 --cuda-steps 60 --workers 4"
    cmd = [PY, "bench/train.py", "--device", "cuda" if cuda else "cpu", *opts.split()]
    rc, text, _ = sh("bench/train.py", cmd, 200, out / "gpu_check_bench.log")
    fig = last_json(text)
    RESULTS["bench_train"] = {"rc": rc, **(fig or {})}
    if fig and cuda:
        result(
            f"RESULT c: training spectra/s batch 256: CPU fp32 {fig['train_fp32_memory']} (bf16 {fig['train_bf16_memory']}); "
            f"cuda fp32 {fig.get('cuda_fp32_device')} ({fig.get('cuda_ratio_fp32_device')}x), cuda bf16 {fig.get('cuda_bf16_device')} "
            f"({fig.get('cuda_ratio_bf16_device')}x), cuda fp32 fed from the store {fig.get('cuda_fp32_store')} "
            f"({fig.get('cuda_ratio_fp32_store')}x)"
        )
    elif fig:
        result(f"RESULT c: training spectra/s batch 256: CPU fp32 {fig['train_fp32_memory']}; no cuda: GPU figures skipped")
    else:
        result(f"RESULT c: bench/train.py FAILED (rc {rc})")


def step_bench_discover(out: Path, run: Path, store: Path, cuda: bool, tiny: bool) -> None:
    """d: bench/discover.py on the trained run and the same store: CPU engines vs torch on cuda."""
    opts = f"--repeat {1 if tiny else 2} --device {'cuda' if cuda else 'cpu'}"
    cmd = [PY, "bench/discover.py", "--run", str(run), "--store", str(store), *opts.split()]
    rc, text, _ = sh("bench/discover.py", cmd, 240, out / "gpu_check_bench.log")
    fig = last_json(text)
    RESULTS["bench_discover"] = {"rc": rc, **(fig or {})}
    if fig and cuda:
        result(
            f"RESULT d: discover scoring loop spectra/s: CPU torch {fig['scoring_loop_spectra_per_s_torch']}, CPU "
            f"{fig['fastest_engine']} {fig['scoring_loop_spectra_per_s_fastest']} (end to end {fig['end_to_end_spectra_per_s']}); "
            f"cuda fp32 {fig.get('cuda_fp32_loop_spectra_per_s')} ({fig.get('cuda_fp32_loop_vs_cpu_torch')}x CPU torch), "
            f"cuda bf16 {fig.get('cuda_bf16_loop_spectra_per_s')} ({fig.get('cuda_bf16_loop_vs_cpu_onnx_int8')}x CPU onnx-int8); "
            f"max |dlogit| fp32 {fig.get('cuda_fp32_max_dlogit_vs_cpu_torch')}"
        )
    elif fig:
        result(f"RESULT d: discover end to end {fig['end_to_end_spectra_per_s']} spectra/s ({fig['fastest_engine']}); no cuda")
    else:
        result(f"RESULT d: bench/discover.py FAILED (rc {rc})")


def step_tests(out: Path) -> None:
    """f: the tests that touch cuda or DDP (few: the suite is made for CPU machines)."""
    cmd = [
        PY,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_hostile.py",
        "tests/test_train.py",
        "-k",
        "cuda or ddp",
    ]
    rc, text, _ = sh("pytest", cmd, 150, out / "gpu_check_bench.log")
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    RESULTS["pytest"] = {"rc": rc, "summary": tail}
    result(f"RESULT f: pytest -k 'cuda or ddp': rc {rc}: {tail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work")))
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("GPU_CHECK_TINY") == "1")
    ap.add_argument("--n", type=int, help="spectra of the simulated survey (default 4000, 150 with --tiny; DDP needs >= 2100)")
    ap.add_argument("--budget", type=float, default=400, help="seconds; optional steps are skipped past it")
    args = ap.parse_args()
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    n = args.n or (150 if args.tiny else 4000)
    workers = 2 if args.tiny else 8
    steps, batch = (4, 32) if args.tiny else (30, 256)
    RESULTS.update(tiny=args.tiny, n=n)

    cuda = step_env(out)
    save(out)
    if not cuda:
        say("no cuda: torch sees no GPU; the cuda parts below are skipped")
    store = step_data(out, work, n, workers)
    save(out)
    run = None
    if store is not None:
        run = step_train_runs(out, work, store, cuda, steps, batch)
        save(out)
    step_bench_train(out, cuda, args.tiny)
    save(out)
    if store is not None and run is not None:
        step_bench_discover(out, run, store, cuda, args.tiny)
    else:
        result("RESULT d: SKIPPED (no store or no trained run)")
    save(out)
    if time.perf_counter() - T0 < args.budget - 150:
        step_tests(out)
    else:
        result(f"RESULT f: SKIPPED (past {args.budget - 150:.0f} s of the {args.budget:.0f} s budget)")
    RESULTS["total_seconds"] = round(time.perf_counter() - T0, 1)
    save(out)
    say("done; summary:")
    for line in SUMMARY:
        print(line)
    print(json.dumps(RESULTS, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
