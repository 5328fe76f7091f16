"""Speed of `read_spectrum` against the same extraction done with astropy and with fitsio.

For every real file in ../shared/data, else tests/data (or the folder given as the first argument) each method
pulls what a reader needs: the spectrum arrays and the ids/class/z keys (SDSS spec: HDU1
columns + HDU2 row; spSpec and LAMOST DR1-7: primary image + header; LAMOST DR8+: HDU1 row +
primary header). Ratios are measured in the same run; the last line is one JSON object.

    .venv/bin/python bench/readers.py [DATA_DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import fitsio
import numpy as np
from astropy.io import fits

from spectransfer.surveys import iter_spectrum_files, read_spectrum

SPEC_ROW = ["PLATE", "MJD", "FIBERID", "CLASS", "SUBCLASS", "Z", "ZWARNING", "PLUG_RA", "PLUG_DEC", "WAVEMIN", "WAVEMAX"]


def with_astropy(path: Path) -> object:
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        hdr = hdul[0].header
        if hdr.get("NAXIS", 0) == 2:
            data = np.array(hdul[0].data)
            return data, {k: hdr.get(k) for k in ("CLASS", "Z", "PLATEID", "LMJD", "SPEC_CLN", "COEFF0")}
        table = hdul[1].data
        names = {n.lower(): n for n in table.columns.names}
        if "loglam" in names:
            arrays = [np.array(table[c]) for c in ("flux", "loglam", "ivar", "and_mask")]
            row = hdul[2].data[0]
            return arrays, {k: row[k] for k in SPEC_ROW}
        arrays = [np.array(table[c][0]) for c in ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK")]
        return arrays, {k: hdr.get(k) for k in ("CLASS", "Z", "LMJD", "PLANID", "OBSID")}


def with_fitsio(path: Path) -> object:
    with fitsio.FITS(str(path)) as f:
        hdr = f[0].read_header()
        if hdr.get("NAXIS", 0) == 2:
            return f[0].read(), {k: hdr.get(k) for k in ("CLASS", "Z", "PLATEID", "LMJD", "SPEC_CLN", "COEFF0")}
        names = {n.lower() for n in f[1].get_colnames()}
        if "loglam" in names:
            arrays = f[1].read(columns=["flux", "loglam", "ivar", "and_mask"])
            return arrays, f[2].read(columns=SPEC_ROW)
        arrays = f[1].read(columns=["FLUX", "IVAR", "WAVELENGTH", "ANDMASK"])
        return arrays, {k: hdr.get(k) for k in ("CLASS", "Z", "LMJD", "PLANID", "OBSID")}


def timed(fn, files: list[Path], repeat: int) -> float:
    for p in files:  # warm the page cache and imports
        fn(p)
    t0 = time.perf_counter()
    for _ in range(repeat):
        for p in files:
            fn(p)
    return (time.perf_counter() - t0) / (repeat * len(files))


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = here.parent / "shared" / "data"
    ap.add_argument("data", nargs="?", default=str(shared if shared.is_dir() else here / "tests" / "data"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    files = [p for p in iter_spectrum_files([Path(args.data)])]
    print(f"{len(files)} files from {args.data}, {args.repeat} passes each")
    t_ours = timed(read_spectrum, files, args.repeat)
    t_astropy = timed(with_astropy, files, args.repeat)
    t_fitsio = timed(with_fitsio, files, args.repeat)
    print(f"read_spectrum : {t_ours * 1e3:7.2f} ms/file  ({1 / t_ours:7.0f} files/s, validated record)")
    print(f"astropy       : {t_astropy * 1e3:7.2f} ms/file  (arrays + keys only)")
    print(f"fitsio        : {t_fitsio * 1e3:7.2f} ms/file  (arrays + keys only)")
    print(f"speed-up: {t_astropy / t_ours:.1f}x astropy, {t_fitsio / t_ours:.1f}x fitsio")
    print(
        json.dumps(
            {
                "n_files": len(files),
                "ms_per_file": round(t_ours * 1e3, 3),
                "files_per_s": round(1 / t_ours, 1),
                "speedup_vs_astropy": round(t_astropy / t_ours, 2),
                "speedup_vs_fitsio": round(t_fitsio / t_ours, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
