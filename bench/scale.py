"""Benchmark: peak memory and spectra/s of ingest, discover and inspect at two survey sizes, and
what they project for the paper's surveys (4M SDSS, 9M LAMOST spectra).

    .venv/bin/python bench/scale.py [--small 2000] [--large 20000] [--keep DIR] [--stages ingest,discover]
                                    [--ingest-copies K]
    .venv/bin/python bench/scale.py --discover-base STORE --small 203008 --large 1015040 [--run RUN]
                                    [--templates none] [--engine onnx-int8] [--block-size 16384] [--keep DIR]

Each size is a survey written by ``spectransfer simulate --survey sdss --n N`` (spec-lite files,
~165 KB each; simulating is not timed). Each stage runs in its own Python process (this script
re-run with ``--stage``), so its peak RSS is its own: VmHWM of the process and ``ru_maxrss`` of
its reaped children (Dask workers), whichever is larger. (Not the process's own ``ru_maxrss``:
Linux carries the spawning process's resident memory into it across exec, so a stage started by
a driver holding 394 MB reported 394 MB whatever it used itself.)

- ingest: ``ingest --workers 0`` of the whole folder into a fresh store (the driver does all),
  its metadata folded in blocks of BLOCK rows (the shipped block is 65,536 rows, above both sizes:
  the slope would show the block filling up, not the survey growing); meta.parquet is then
  rewritten here in the shipped 65,536-row groups, which discover reads. ``--ingest-copies K``
  ingests the folder and K - 1 hard-linked copies of it (K x n files on the disk of one; every
  file is read, resampled and written, the copies' spectra recorded as duplicates): the driver
  runs K times the batches. At 2,000 and 20,000 spectra a batch's transient (~260 MB) is the
  peak at both sizes and the slope is its noise (262 -> 267 MB, "0.27 KB/spectrum"); 20,000 x 5
  = 100,000 files gave 265.5 MB (0.03 KB/spectrum), the driver at ~224 MB between batches from
  the 40th batch to the 391st.
- ingest_end: what ingest does last, alone, at metadata sizes no simulated survey here reaches:
  the ingested store's metadata replicated END_FACTOR times (new spectrum ids and files, sky
  positions moved 36 arcsec per copy, rows after each other; written by the driver, not timed)
  is split into objects and train/val/test and meta.parquet rewritten with them, in the shipped
  65,536-row groups (``_write_split``), then counted per split as the summary does. Its n is
  that number of rows (END_FACTOR x the survey's live spectra).
- discover: ``discover --engine torch --block-size 1024`` of the store with an untrained VGG-A run (the weights do
  not change the memory or the time), writing a .fits catalogue and its .parquet copy. Its
  redshift refinement reads and fits the positives (with untrained weights nearly all spectra)
  in blocks of BLOCK too, not the shipped 4,096: at 2,000 spectra the shipped block is not
  full and the slope showed it filling up (813 MB at 20k vs 643 MB at 2k; 661 vs 645 MB with
  1,024-spectrum blocks).
- inspect_build: the first start of the app on the catalogue, which copies it into the queue
  file beside it (SQLite); inspect: a later start (the queue file reused), as
  ``spectransfer inspect`` starts it, then the first requests the page makes (info, one page of
  candidates, one spectrum).

``--discover-base STORE`` runs discover alone, as the CLI does by default (onnx-int8, 16,384-row
blocks, the shipped refinement and template blocks, ``--templates`` as given), on survey-sized
stores replicated from STORE without copying a spectrum (``replicate_store``: chunk i of the
arrays is a symlink to STORE's chunk i mod its whole chunks; meta.parquet repeats STORE's rows
under new spectrum and object ids and plates, in the shipped 65,536-row groups): 1M spectra
need ~25 MB of disk besides the catalogue. Its result also gives each step's own peak
(``phases_mb``: VmHWM reset before ``_prepare`` (the int8 quantisation), ``_score``,
``_finish`` (templates, redshifts, counts) and each ``write_blocks``; ``between``: the rest),
the share of spectra in the templates' uncertain band with the run given (``band_fraction``)
and the process's CPU time a spectrum (steadier than spectra/s on a shared machine).

The per-spectrum growth is the slope between the two sizes; the projection adds it to the
small size's peak. Human lines first, then one JSON line:
``{"ingest": {...}, "discover": {...}, "inspect_build": {...}, "inspect": {...}}`` with rss_mb_small, rss_mb_large,
kb_per_spectrum, projected_rss_gb_4m, projected_rss_gb_9m, spectra_per_s_small and
spectra_per_s_large per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("ingest", "ingest_end", "discover", "inspect_build", "inspect")
SURVEYS = {"4m": 4_000_000, "9m": 9_000_000}
BLOCK = 1024  # discover's block: below both sizes, so what grows between them is per survey, not per block
END_FACTOR = 100  # ingest_end: the survey's metadata replicated this many times (2,000 -> ~200k rows, 20,000 -> ~2M)


# ---- the stages, each run in a child process ----------------------------------------------------


def _stage_ingest(work: Path) -> int:
    import spectransfer.data.ingest as ingest_mod
    from spectransfer.data.ingest import ingest

    ingest_mod.META_ROW_GROUP = BLOCK  # fold metadata in blocks below both sizes, as discover's

    copies = sorted(str(c) for c in (work / "copies").glob("c*")) if (work / "copies").is_dir() else []
    s = ingest(
        [str(work / "sim" / "spectra"), *copies],
        work / "store",
        survey="sdss",
        catalogs=[str(next((work / "sim").glob("*quasar_catalog.fits")))],
        workers=0,
        quiet=True,
    )
    return int(s.files_seen)


def _stage_ingest_end(work: Path) -> int:
    from spectransfer.data.ingest import _column_counts, _write_split
    from spectransfer.data.splits import SplitConfig
    from spectransfer.data.store import open_store

    store = open_store(work / "end", mode="r+")
    cfg = SplitConfig.from_dict(store.info["splits"]["config"])
    _, _, n, _ = _write_split(store, work / "end" / ".meta-unsplit.parquet", cfg)
    _column_counts(work / "end" / "meta.parquet", "split")
    return n


def _stage_discover(work: Path) -> int:
    import spectransfer.candidates.decision as decision_mod
    import spectransfer.candidates.discover as discover_mod
    from spectransfer.candidates.discover import discover

    cfg = json.loads((work / "discover.json").read_text()) if (work / "discover.json").is_file() else {}
    if not cfg:  # a simulated survey: blocks below both sizes
        discover_mod.REFINE_BLOCK = BLOCK  # refine positives in blocks below both sizes, as the scoring
        decision_mod.READ_BLOCK = BLOCK  # and the template decision's reads
    _watch_phases(discover_mod, ("_prepare", "_score", "_finish", "write_blocks"))
    res = discover(
        Path(cfg.get("run", work / "run")),
        work / "store",
        work / "cand.fits",
        engine=cfg.get("engine", "torch"),
        block_size=int(cfg.get("block_size", BLOCK)),
        templates=cfg.get("templates", "uncertain"),
        quiet=True,
    )
    if cfg:  # the share of spectra in the templates' uncertain band (what --templates uncertain fits)
        import pyarrow.parquet as pq

        lo, hi = decision_mod.UNCERTAIN
        p = pq.read_table(work / "cand.parquet", columns=["P_QSO"]).column("P_QSO").to_numpy()
        _PHASES["band_fraction"] = float(((p >= lo) & (p <= hi)).mean()) if p.size else 0.0
    return res.n_spectra


# peak RSS (MB) of each watched step since the previous one ended (VmHWM reset between steps)
_PHASES: dict[str, float] = {}


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _watch_phases(module: object, names: tuple[str, ...]) -> None:
    """Wrap ``module``'s functions ``names`` so that each call records its own peak RSS in _PHASES
    (a step called twice, as write_blocks for the .fits and its .parquet copy, keeps the larger)."""
    if not _reset_peak():
        return
    import functools

    for name in names:
        fn = getattr(module, name)

        def wrapped(*a: object, _fn: object = fn, _name: str = name, **k: object) -> object:
            before = _own_peak_kb() / 1024  # what ran since the last step (opening, summaries)
            _PHASES["between"] = max(_PHASES.get("between", 0.0), before)
            _reset_peak()
            try:
                return _fn(*a, **k)  # type: ignore[operator]
            finally:
                _PHASES[_name] = max(_PHASES.get(_name, 0.0), _own_peak_kb() / 1024)
                _reset_peak()

        functools.update_wrapper(wrapped, fn)
        setattr(module, name, wrapped)


def _stage_inspect_build(work: Path) -> int:
    import spectransfer.inspect.app as app_mod
    from spectransfer.inspect.app import create_app

    app_mod.BUILD_BLOCK = BLOCK  # copy in blocks below both sizes, so the slope is the survey's
    app = create_app(work / "cand.parquet", None, work / "verdicts.sqlite")  # copies the catalogue into its queue file
    return int(app.state.queue.n)


def _stage_inspect(work: Path) -> int:
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

    from spectransfer.data.store import open_store
    from spectransfer.inspect.app import create_app

    app = create_app(work / "cand.parquet", open_store(work / "store"), work / "verdicts.sqlite")
    client = TestClient(app, base_url="http://127.0.0.1")
    n = client.get("/api/info").json()["n_candidates"]
    page = client.get("/api/candidates", params={"category": "new_candidate,agree_qso", "limit": 100}).json()
    first = (page["items"] or client.get("/api/candidates", params={"limit": 1}).json()["items"])[0]["id"]
    assert client.get(f"/api/spectrum/{first}").status_code == 200
    return int(n)


def _own_peak_kb() -> int:
    """This process image's peak resident memory in KB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_stage(stage: str, work: Path) -> None:
    """Run one stage here and print one JSON line: spectra, seconds, peak RSS (MB)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    stages = {
        "ingest": _stage_ingest,
        "ingest_end": _stage_ingest_end,
        "discover": _stage_discover,
        "inspect_build": _stage_inspect_build,
        "inspect": _stage_inspect,
    }
    n = stages[stage](work)
    sec = time.perf_counter() - t0
    peak = max(_own_peak_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    phases = {k: round(v, 1) for k, v in _PHASES.items() if k != "band_fraction"}
    peak = max([peak / 1024, *phases.values()])  # the steps' peaks: VmHWM was reset between them
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu = use.ru_utime + use.ru_stime  # this process's CPU seconds: steadier than the rate on a shared machine
    out = {"stage": stage, "n": n, "seconds": sec, "rss_mb": peak, "cpu_s": round(cpu, 1)}
    if phases:
        out["phases_mb"] = phases
    if "band_fraction" in _PHASES:
        out["band_fraction"] = round(_PHASES["band_fraction"], 4)
    print(json.dumps(out))


# ---- the driver ---------------------------------------------------------------------------------


def _child(stage: str, work: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--work", str(work)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        sys.exit(f"{stage} failed in {work}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _regroup(path: Path) -> None:
    """Rewrite meta.parquet in the row groups the shipped ingest writes (65,536 rows): the bench's
    ingest wrote BLOCK-row groups, and discover reading 1,024-row groups peaks ~140 MB higher at 20k."""
    import pyarrow.parquet as pq

    from spectransfer.data.store import META_ROW_GROUP

    table = pq.read_table(path)
    pq.write_table(table, path.with_suffix(".tmp"), compression="zstd", row_group_size=META_ROW_GROUP)
    os.replace(path.with_suffix(".tmp"), path)


def _replicate(work: Path, factor: int) -> None:
    """WORK/end: a store holding the ingested metadata ``factor`` times over, as consolidation's
    unsplit table (new spectrum ids and files, ra + 0.01 deg per copy, rows after each other, no
    prior object ids), in the shipped row groups; its arrays are not needed and not copied."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from spectransfer.data.store import META_ROW_GROUP

    end = work / "end"
    shutil.rmtree(end, ignore_errors=True)
    (end / "spectra.zarr").mkdir(parents=True)
    shutil.copy2(work / "store" / "store.json", end / "store.json")
    table = pq.read_table(work / "store" / "meta.parquet")
    step = pc.max(table.column("row")).as_py() + 1
    with pq.ParquetWriter(end / ".meta-unsplit.parquet", table.schema, compression="zstd") as writer:
        for r in range(factor):
            cols = {name: table.column(name) for name in table.column_names}
            cols["spectrum_id"] = pc.binary_join_element_wise(cols["spectrum_id"], pa.scalar(f"r{r:04d}"), "-")
            cols["source_file"] = pc.binary_join_element_wise(pa.scalar(f"r{r:04d}"), cols["source_file"], "/")
            cols["ra"] = pc.add(cols["ra"], 0.01 * r)
            cols["row"] = pc.add(cols["row"], step * r)
            cols["object_id"] = pa.nulls(table.num_rows, cols["object_id"].type)
            writer.write_table(pa.table(cols, schema=table.schema), row_group_size=META_ROW_GROUP)


def _link_copies(work: Path, copies: int) -> None:
    """WORK/copies/c1 .. c(copies - 1): the simulated spectra folder again, as hard links."""
    for i in range(1, copies):
        shutil.copytree(work / "sim" / "spectra", work / "copies" / f"c{i}", copy_function=os.link)


PLATE_STEP = 1_000_000  # plates of copy r: the base's + r x this (the demo-derived base's plates stay below 600,000)


def replicate_store(base: Path, out: Path, n: int) -> int:
    """OUT: a store of ``n`` spectra built from BASE without copying a spectrum.

    BASE is trimmed to whole chunks (nb rows, its meta.parquet in row order 0..nb-1 live);
    chunk i of OUT's flux and ivar is a symlink to BASE's chunk i mod (nb / chunk), so row j
    holds BASE's row j mod nb. Its zarr.json files say (n, n_bins); meta.parquet repeats BASE's
    rows with copy r = j // nb's own spectrum and object ids (suffix ``-rR``), plates + R x
    PLATE_STEP and rows + R x nb, in the shipped 65,536-row groups. Returns nb."""
    import uuid

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from spectransfer.data.store import META_ROW_GROUP, open_store

    src = open_store(base)
    chunk = src.chunk_rows
    nb = (src.n_rows // chunk) * chunk
    table = pq.read_table(base / "meta.parquet").cast(src.schema)
    rows = table.column("row").to_numpy()
    if not (rows.size >= nb and (rows[:nb] == range(nb)).all()):
        sys.exit(f"{base}: meta.parquet is not rows 0..{nb - 1} in order (replicate needs a store written whole)")
    table = table.slice(0, nb)
    shutil.rmtree(out, ignore_errors=True)
    (out / "spectra.zarr").mkdir(parents=True)
    shutil.copy2(base / "spectra.zarr" / "zarr.json", out / "spectra.zarr" / "zarr.json")
    n_chunks = -(-n // chunk)
    for name in ("flux", "ivar"):
        meta = json.loads((base / "spectra.zarr" / name / "zarr.json").read_text())
        meta["shape"][0] = n
        (out / "spectra.zarr" / name / "c").mkdir(parents=True)
        (out / "spectra.zarr" / name / "zarr.json").write_text(json.dumps(meta, indent=2))
        for i in range(n_chunks):
            target = (base / "spectra.zarr" / name / "c" / str(i % (nb // chunk)) / "0").resolve()
            if target.is_file():  # zarr leaves an all-fill chunk unwritten: the copy reads the fill too
                (out / "spectra.zarr" / name / "c" / str(i)).mkdir()
                os.symlink(target, out / "spectra.zarr" / name / "c" / str(i) / "0")
    info = json.loads((base / "store.json").read_text())
    info["store_id"] = str(uuid.uuid4())
    info["replicated_from"] = {"store_id": src.info.get("store_id"), "rows": nb, "n": n}
    (out / "store.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.copy2(base / "rejected.parquet", out / "rejected.parquet")
    with pq.ParquetWriter(out / "meta.parquet", table.schema, compression="zstd") as writer:
        pending = table.slice(0, 0)
        for r in range(-(-n // nb)):
            part = table.slice(0, min(nb, n - r * nb))
            cols = {k: part.column(k) for k in part.column_names}
            for k in ("spectrum_id", "object_id"):
                cols[k] = pc.binary_join_element_wise(cols[k], pa.scalar(f"r{r}"), "-")
            cols["plate"] = pc.add(cols["plate"], PLATE_STEP * r)
            cols["row"] = pc.add(cols["row"], nb * r)
            pending = pa.concat_tables([pending, pa.table(cols, schema=table.schema)])
            full = (pending.num_rows // META_ROW_GROUP) * META_ROW_GROUP
            if full:
                writer.write_table(pending.slice(0, full), row_group_size=META_ROW_GROUP)
                pending = pending.slice(full).combine_chunks()
        if pending.num_rows:
            writer.write_table(pending, row_group_size=META_ROW_GROUP)
    return nb


def prepare(work: Path, n: int, seed: int) -> None:
    """Simulate an SDSS-like survey of n spectra and write an untrained run on the default grid."""
    import torch

    from spectransfer.config import DEFAULT_GRID
    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "spectransfer",
            "simulate",
            "--survey",
            "sdss",
            "--n",
            str(n),
            "--out",
            str(work / "sim"),
            "--seed",
            str(seed),
            "--quiet",
        ],
        check=True,
    )
    torch.manual_seed(0)
    (work / "run").mkdir(exist_ok=True)
    save_weights(
        build_model(ModelConfig(name="vgg-a", n_bins=DEFAULT_GRID.n_bins)),
        work / "run" / "model.safetensors",
        DEFAULT_GRID,
        mode="scratch",
    )


def prepare_replicated(work: Path, n: int, args: argparse.Namespace) -> None:
    """WORK/store: n spectra replicated from --discover-base; WORK/discover.json: discover's settings."""
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    work.mkdir(parents=True, exist_ok=True)
    replicate_store(args.discover_base, work / "store", n)
    run = args.run
    if run is None:
        from spectransfer.data.store import open_store

        torch.manual_seed(0)
        run = work / "run"
        run.mkdir(exist_ok=True)
        grid = open_store(work / "store").grid
        save_weights(build_model(ModelConfig(name="vgg-a", n_bins=grid.n_bins)), run / "model.safetensors", grid, mode="scratch")
    cfg = {"run": str(Path(run).resolve()), "engine": args.engine, "templates": args.templates, "block_size": args.block_size}
    (work / "discover.json").write_text(json.dumps(cfg))


def summarise(small: dict, large: dict) -> dict:
    """Slope between the sizes and what it projects for the paper's surveys."""
    ns, nl = small["n"], large["n"]
    kb = (large["rss_mb"] - small["rss_mb"]) * 1024 / max(nl - ns, 1)
    out = {
        "rss_mb_small": round(small["rss_mb"], 1),
        "rss_mb_large": round(large["rss_mb"], 1),
        "n_small": ns,
        "n_large": nl,
        "kb_per_spectrum": round(kb, 3),
    }
    for name, n in SURVEYS.items():
        projected = max(small["rss_mb"] + kb * (n - ns) / 1024, small["rss_mb"], large["rss_mb"])  # noise can make kb < 0
        out[f"projected_rss_gb_{name}"] = round(projected / 1024, 2)
    out["spectra_per_s_small"] = round(ns / small["seconds"], 1)
    out["spectra_per_s_large"] = round(nl / large["seconds"], 1)
    if "cpu_s" in small and "cpu_s" in large:
        out["cpu_ms_per_spectrum_small"] = round(1000 * small["cpu_s"] / max(ns, 1), 3)
        out["cpu_ms_per_spectrum_large"] = round(1000 * large["cpu_s"] / max(nl, 1), 3)
    for key in ("phases_mb", "band_fraction"):  # discover: each step's own peak; the templates' band
        if key in small:
            out[f"{key}_small"], out[f"{key}_large"] = small[key], large.get(key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000, help="spectra of the small survey")
    ap.add_argument("--large", type=int, default=20000, help="spectra of the large survey (>= 10x small is best)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated stages to run (default all: {','.join(STAGES)}; ingest_end and discover need ingest)",
    )
    ap.add_argument(
        "--ingest-copies",
        type=int,
        default=1,
        help="ingest the simulated folder and this many - 1 hard-linked copies of it (more batches, no more disk)",
    )
    ap.add_argument(
        "--discover-base",
        type=Path,
        default=None,
        help="run only discover, on stores of --small and --large spectra replicated from this store "
        "(chunk files symlinked, metadata repeated under new ids: no spectrum copied)",
    )
    ap.add_argument(
        "--run", type=Path, default=None, help="with --discover-base: the run to score with (default an untrained VGG-A)"
    )
    ap.add_argument(
        "--engine", default="onnx-int8", help="with --discover-base: discover's engine (default: the CLI's, onnx-int8)"
    )
    ap.add_argument("--templates", default="uncertain", help="with --discover-base: discover's --templates (default: the CLI's)")
    ap.add_argument("--block-size", type=int, default=16384, help="with --discover-base: discover's block (default: the CLI's)")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        run_stage(args.stage, args.work)
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} (a shared machine makes the rates noisy; memory is not)")
    stages = ["discover"] if args.discover_base else [s for s in STAGES if s in args.stages.split(",")]
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results: dict[str, dict[str, dict]] = {s: {} for s in stages}
    try:
        for label, n in (("small", args.small), ("large", args.large)):
            work = base / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            t0 = time.perf_counter()
            if args.discover_base:
                prepare_replicated(work, n, args)
                print(f"{label}: {n} spectra replicated from {args.discover_base} in {time.perf_counter() - t0:.0f} s")
            else:
                prepare(work, n, args.seed)
                _link_copies(work, args.ingest_copies)
                print(f"{label}: simulated {n} spectra in {time.perf_counter() - t0:.0f} s")
            for stage in stages:
                r = results[stage][label] = _child(stage, work)
                if stage == "ingest":
                    _regroup(work / "store" / "meta.parquet")
                    if "ingest_end" in stages:
                        _replicate(work, END_FACTOR)
                print(
                    f"  {stage:13s} n={r['n']:>7d}  {r['seconds']:7.1f} s  {r['n'] / r['seconds']:8.1f} spectra/s  peak RSS {r['rss_mb']:7.1f} MB"
                    + (f"  steps {r['phases_mb']}" if "phases_mb" in r else "")
                    + (f"  band {r['band_fraction']:.1%}" if "band_fraction" in r else "")
                    + (f"  {1000 * r['cpu_s'] / max(r['n'], 1):.2f} ms CPU a spectrum" if "cpu_s" in r else "")
                )
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    summary = {s: summarise(results[s]["small"], results[s]["large"]) for s in stages}
    for s, r in summary.items():
        print(
            f"{s:13s} {r['rss_mb_small']:7.1f} -> {r['rss_mb_large']:7.1f} MB  {r['kb_per_spectrum']:6.2f} KB/spectrum  "
            f"projected {r['projected_rss_gb_4m']:6.2f} GB at 4M, {r['projected_rss_gb_9m']:6.2f} GB at 9M  "
            f"{r['spectra_per_s_small']:.0f} / {r['spectra_per_s_large']:.0f} spectra/s"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
