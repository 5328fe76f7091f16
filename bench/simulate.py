"""How fast `spectransfer simulate` writes survey files, against astropy writing the same files.

Prints human-readable lines, then one JSON line: files_per_s (wall clock, both surveys, the
default 2 workers), per survey, CPU ms per file and the rate that CPU time allows on two idle
cores, and the speed-up of the byte-level FITS writer over astropy writing identical HDUs
(measured in this run on the same arrays).

    .venv/bin/python bench/simulate.py [--n 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_s() -> float:
    self_ = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def _run(survey: str, n: int, workers: int, root: Path) -> tuple[float, float]:
    from spectransfer.simulate import simulate_survey

    out = root / survey
    c0, t0 = _cpu_s(), time.perf_counter()
    res = simulate_survey(survey, n, out, seed=1, workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    assert res.n_files == n
    return wall, cpu


def _writer_vs_astropy(root: Path, n_files: int = 150) -> tuple[float, float]:
    """Time our writer and astropy on the same spec-lite HDUs (files/s each)."""
    from astropy.io import fits

    src = sorted((root / "sdss").rglob("spec-*.fits"))[:n_files]
    hduls = [fits.open(p) for p in src]
    parts = []
    for h in hduls:
        parts.append((h[0].header.copy(), np.array(h[1].data), np.array(h[2].data), h[1].header.copy(), h[2].header.copy()))
        h.close()
    from spectransfer.simulate import formats

    out_a = root / "astropy"
    out_b = root / "bytes"
    out_a.mkdir()
    out_b.mkdir()
    t0 = time.perf_counter()
    for k, (ph, coadd, spall, _, _) in enumerate(parts):
        fits.HDUList(
            [fits.PrimaryHDU(header=ph), fits.BinTableHDU(coadd, name="COADD"), fits.BinTableHDU(spall, name="SPALL")]
        ).writeto(out_a / f"{k}.fits")
    t_astropy = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k, (ph, coadd, spall, _, _) in enumerate(parts):
        cards = [str(c.image) for c in ph.cards]
        data = formats.sdss_file_bytes(cards, coadd.astype(formats.COADD_DTYPE), spall.astype(formats.SPALL_DTYPE))
        (out_b / f"{k}.fits").write_bytes(data)
    t_bytes = time.perf_counter() - t0
    # Same content either way.
    with fits.open(out_a / "0.fits") as a, fits.open(out_b / "0.fits") as b:
        assert np.array_equal(a[1].data["flux"], b[1].data["flux"]) and a[2].data["Z"][0] == b[2].data["Z"][0]
    return len(parts) / t_astropy, len(parts) / t_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000, help="files per survey")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-simulate-"))
    try:
        import astropy.io.fits  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        import spectransfer.simulate.survey  # noqa: F401  (imports outside the timing)

        figures: dict[str, float] = {}
        total_wall = 0.0
        for survey in ("sdss", "lamost"):
            wall, cpu = _run(survey, args.n, args.workers, root)
            total_wall += wall
            figures[f"{survey}_files_per_s"] = round(args.n / wall, 1)
            figures[f"{survey}_cpu_ms_per_file"] = round(1000 * cpu / args.n, 2)
            print(
                f"{survey}: {args.n} files in {wall:.2f} s wall with {args.workers} workers = {args.n / wall:.0f} files/s; {1000 * cpu / args.n:.2f} ms CPU per file"
            )
        figures["files_per_s"] = round(2 * args.n / total_wall, 1)
        # What the CPU time allows on 2 otherwise idle cores (the wall figure above suffers
        # when other work shares the machine).
        cpu_ms = 0.5 * (figures["sdss_cpu_ms_per_file"] + figures["lamost_cpu_ms_per_file"])
        figures["cpu_bound_files_per_s_2_cores"] = round(2000.0 / cpu_ms, 1)
        per_astropy, per_bytes = _writer_vs_astropy(root)
        figures["writer_files_per_s"] = round(per_bytes, 1)
        figures["astropy_writer_files_per_s"] = round(per_astropy, 1)
        figures["writer_speedup_vs_astropy"] = round(per_bytes / per_astropy, 2)
        print(
            f"spec-lite writing alone: bytes writer {per_bytes:.0f} files/s, astropy {per_astropy:.0f} files/s ({per_bytes / per_astropy:.1f}x)"
        )
        print(
            f"both surveys: {figures['files_per_s']:.0f} files/s wall; CPU time allows {figures['cpu_bound_files_per_s_2_cores']:.0f} files/s on 2 idle cores (target >= 300)"
        )
        print(json.dumps(figures))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
