"""Stream spectra from a store into PyTorch in whole zarr chunks, with memory bounded.

The original code loaded every spectrum into RAM; a 9-million-spectrum survey does not fit.
``ChunkStream`` reads whole row-chunks of the store's ``flux`` (and ``ivar``) arrays, one
*window* of a few chunks at a time, shuffles rows inside the window, and yields ready-made
batches. Memory is one window plus one batch per worker, whatever the store's size.

The order of an epoch is a pure function of (seed, epoch, rank, world size, number of
DataLoader workers): the chunk order is shuffled, consecutive chunks form windows, windows
are dealt round-robin to ranks and then to workers, and each window's rows are permuted with
a generator seeded by (seed, epoch, window). Because the DataLoader takes batches from its
workers round-robin, the position of the stream is one integer (batches consumed this
epoch), and a resumed run can skip exactly what was consumed without reading it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spectransfer.data.resample import scale_noise

log = logging.getLogger(__name__)

DEPTH_SNR_MIN = 1.0  # the faintest median S/N per pixel the depth augmentation goes down to


def make_input(flux: np.ndarray, ivar: np.ndarray | None, in_channels: int) -> np.ndarray:
    """The network input (batch, channels, n_bins) float32 for a block of spectra.

    Channel 0 is the store's normalised flux (the paper's only input). With two channels the
    second is sqrt(ivar) divided by its per-spectrum maximum: 1 where the spectrum is most
    certain, 0 where there is no data, so the scale is the same for every survey.
    """
    flux = np.asarray(flux, dtype=np.float32)
    if in_channels == 1:
        return flux[:, None, :]
    if ivar is None:
        raise ValueError("a two-channel model needs the ivar array")
    sigma_w = np.sqrt(np.clip(np.asarray(ivar, dtype=np.float32), 0.0, None))
    peak = sigma_w.max(axis=1, keepdims=True)
    sigma_w = np.divide(sigma_w, peak, out=np.zeros_like(sigma_w), where=peak > 0)
    return np.stack([flux, sigma_w], axis=1)


@dataclass(frozen=True)
class Selection:
    """Rows of a store chosen for one purpose, with their labels (sorted by row) and, for
    quasars, the catalogue redshift (NaN where there is none: non-quasars, quasars without z)."""

    rows: np.ndarray  # int64, sorted, unique
    labels: np.ndarray  # float32, aligned with rows
    z: np.ndarray | None = None  # float32, aligned with rows; None: the store has no catalog_z
    snr: np.ndarray | None = None  # float32 median S/N per row (meta ``snr``; NaN unknown); None: no column

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def n_pos(self) -> int:
        return int((self.labels > 0.5).sum())

    @property
    def n_z(self) -> int:
        """Rows with a redshift to learn from."""
        return 0 if self.z is None else int(np.isfinite(self.z).sum())

    def z_of(self, rows: np.ndarray) -> np.ndarray:
        """The redshift (NaN where none) of ``rows``, which must be rows of this selection."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.z is None:
            return np.full(rows.shape, np.nan, dtype=np.float32)
        return self.z[np.searchsorted(self.rows, rows)]

    def subset(self, fraction: float | None = None, limit: int | None = None, seed: int = 0) -> Selection:
        """A deterministic random subset: ``fraction`` of the rows, then at most ``limit``."""
        n = len(self)
        k = n
        if fraction is not None:
            k = int(round(n * fraction))
        if limit is not None:
            k = min(k, int(limit))
        if k >= n:
            return self
        pick = np.sort(np.random.default_rng([seed, 0x5EED]).permutation(n)[:k])
        return Selection(
            self.rows[pick],
            self.labels[pick],
            None if self.z is None else self.z[pick],
            None if self.snr is None else self.snr[pick],
        )


def select(store: Any, survey: str | None = None, split: str | None = None) -> Selection:
    """The rows of ``store`` in ``survey`` and ``split`` with their 0/1 labels and, for
    spectra labelled quasar, the catalogue redshift (meta column ``catalog_z``)."""
    rows = np.asarray(store.rows(survey=survey, split=split), dtype=np.int64)
    meta = store.meta
    size = int(meta["row"].max()) + 1 if len(meta) else 0
    at = meta["row"].to_numpy(dtype=np.int64)
    labels_by_row = np.zeros(size, dtype=np.float32)
    labels_by_row[at] = meta["label"].to_numpy(dtype=np.float32, na_value=0)
    z_by_row = None
    if "catalog_z" in meta.columns:
        z_by_row = np.full(size, np.nan, dtype=np.float32)
        z = meta["catalog_z"].to_numpy(dtype=np.float32, na_value=np.nan)
        z_by_row[at] = np.where((labels_by_row[at] > 0.5) & np.isfinite(z) & (z >= 0), z, np.nan)
    snr_by_row = None
    if "snr" in meta.columns:
        snr_by_row = np.full(size, np.nan, dtype=np.float32)
        snr_by_row[at] = pd.to_numeric(meta["snr"], errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
    rows = np.unique(rows)
    return Selection(
        rows,
        labels_by_row[rows] if rows.size else np.zeros(0, np.float32),
        None if z_by_row is None else z_by_row[rows],
        None if snr_by_row is None else snr_by_row[rows],
    )


class ChunkStream(IterableDataset):
    """Batches (x, y, row) streamed from a store's arrays, chunk by chunk.

    ``x`` is float32 (B, in_channels, n_bins), ``y`` float32 (B,), ``row`` int64 (B,). Use with
    ``DataLoader(stream, batch_size=None, num_workers=W)`` (see ``loader``); call
    ``set_epoch`` and ``set_start`` before creating each epoch's iterator.

    ``balanced=True`` resamples each window with replacement so that positives and negatives
    are drawn with equal total weight (a streaming WeightedRandomSampler): every batch is
    about half quasars, at the cost of repeating the rare positives.

    ``depth`` > 0: that fraction of the rows is shown as if observed more shallowly
    (``shallower``, scaled again over ``grid``'s scale bins as ingest does), drawn afresh for
    every window and epoch from the seed.
    """

    def __init__(
        self,
        flux: Any,
        selection: Selection,
        *,
        ivar: Any = None,
        in_channels: int = 1,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 4,
        balanced: bool = False,
        rank: int = 0,
        world_size: int = 1,
        depth: float = 0.0,
        grid: Any = None,
    ) -> None:
        super().__init__()
        if in_channels == 2 and ivar is None:
            raise ValueError("a two-channel input needs the ivar array")
        if depth > 0 and (ivar is None or selection.snr is None):
            raise ValueError("depth augmentation needs the ivar array and the rows' S/N (meta column snr)")
        self.flux = flux
        self.ivar = ivar if in_channels == 2 or depth > 0 else None
        self.depth = float(depth)
        self.grid = grid  # the store's grid: shallower rows are scaled as ingest scales them
        self.sel = selection
        self.in_channels = in_channels
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.balanced = balanced
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start = 0  # batches of this epoch already consumed (DataLoader order)
        self.num_workers = 1  # set by ``loader``; the epoch plan depends on it
        self.chunk_rows = int(flux.chunks[0])
        chunk_of = self.sel.rows // self.chunk_rows
        self._chunks, self._chunk_start = np.unique(chunk_of, return_index=True)
        self._chunk_stop = np.append(self._chunk_start[1:], self.sel.rows.size)
        n_pos = max(self.sel.n_pos, 1)
        n_neg = max(len(self.sel) - self.sel.n_pos, 1)
        self._class_weight = (0.5 / n_neg, 0.5 / n_pos)

    # ---- the plan of an epoch: which window goes where, and how many batches each yields --

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batches_consumed: int) -> None:
        self.start = int(batches_consumed)

    def _windows(self) -> list[np.ndarray]:
        """Chunk positions (indices into self._chunks) of every window, in epoch order."""
        order = np.arange(self._chunks.size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(order)
        return [order[i : i + self.buffer_chunks] for i in range(0, order.size, self.buffer_chunks)]

    def _window_ids(self, rank: int, worker: int) -> list[int]:
        n_windows = -(-self._chunks.size // self.buffer_chunks)
        mine = list(range(rank, n_windows, self.world_size))
        return mine[worker :: self.num_workers]

    def _window_rows(self, windows: list[np.ndarray], w: int) -> int:
        return int(sum(self._chunk_stop[c] - self._chunk_start[c] for c in windows[w]))

    def worker_batches(self, rank: int | None = None) -> list[int]:
        """Number of batches each DataLoader worker of ``rank`` yields this epoch."""
        rank = self.rank if rank is None else rank
        windows = self._windows()
        counts = []
        for worker in range(self.num_workers):
            n = sum(self._window_rows(windows, w) for w in self._window_ids(rank, worker))
            counts.append(-(-n // self.batch_size))
        return counts

    def batches_per_rank(self) -> list[int]:
        """Batches every rank yields this epoch (DDP steps the minimum of these)."""
        return [sum(self.worker_batches(r)) for r in range(self.world_size)]

    # ---- iteration ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError("ChunkStream.num_workers must match the DataLoader's (use dataset.loader)")
        skips, nxt = _round_robin_skips(self.worker_batches(), self.start)
        # A new DataLoader asks its worker 0 first: rotate so that it plays the worker whose
        # turn it is in the interrupted epoch, and the stream continues in the same order.
        worker = (nxt + (0 if info is None else info.id)) % self.num_workers
        skip_rows = skips[worker] * self.batch_size
        windows = self._windows()
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        n_pending = 0
        for w in self._window_ids(self.rank, worker):
            n = self._window_rows(windows, w)
            if skip_rows >= n:  # consumed before a resume: skip without reading
                skip_rows -= n
                continue
            x, y, r = self._read_window(windows, w)
            if skip_rows:
                x, y, r = x[skip_rows:], y[skip_rows:], r[skip_rows:]
                skip_rows = 0
            pending.append((x, y, r))
            n_pending += len(r)
            while n_pending >= self.batch_size:
                batch, pending, n_pending = _take(pending, self.batch_size)
                yield batch
        if n_pending:
            batch, pending, n_pending = _take(pending, n_pending)
            yield batch

    def _read_window(self, windows: list[np.ndarray], w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, ys, rs = [], [], []
        depth_rng = np.random.default_rng([self.seed, self.epoch, 3, w])
        for c in windows[w]:
            chunk = int(self._chunks[c])
            lo = chunk * self.chunk_rows
            part = slice(self._chunk_start[c], self._chunk_stop[c])
            rows = self.sel.rows[part]
            local = rows - lo
            hi = lo + int(local.max()) + 1
            flux = np.asarray(self.flux[lo:hi])[local]  # one whole-chunk read
            ivar = np.asarray(self.ivar[lo:hi])[local] if self.ivar is not None else None
            if self.depth > 0 and ivar is not None and self.sel.snr is not None:
                flux, ivar = shallower(flux, ivar, self.sel.snr[part], self.depth, depth_rng, grid=self.grid)
            xs.append(make_input(flux, ivar, self.in_channels))
            ys.append(self.sel.labels[part])
            rs.append(rows)
        x, y, r = np.concatenate(xs), np.concatenate(ys), np.concatenate(rs)
        if self.shuffle or self.balanced:
            rng = np.random.default_rng([self.seed, self.epoch, 2, w])
            if self.balanced:
                p = np.where(y > 0.5, self._class_weight[1], self._class_weight[0])
                order = rng.choice(len(r), size=len(r), replace=True, p=p / p.sum())
            else:
                order = rng.permutation(len(r))
            x, y, r = x[order], y[order], r[order]
        return x, y, r

    def loader(self, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A DataLoader over this stream with ``num_workers`` processes (0 = in process)."""
        self.num_workers = max(1, int(num_workers))
        if num_workers > 0:
            kwargs.setdefault("persistent_workers", False)
            kwargs.setdefault("prefetch_factor", 2)
        return DataLoader(self, batch_size=None, num_workers=num_workers, **kwargs)


def _take(pending: list, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list, int]:
    """The first ``n`` rows of the pending blocks as one batch, and what is left."""
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    need = n
    while need:
        x, y, r = pending[0]
        if len(r) <= need:
            out.append(pending.pop(0))
            need -= len(r)
        else:
            out.append((x[:need], y[:need], r[:need]))
            pending[0] = (x[need:], y[need:], r[need:])
            need = 0
    left = sum(len(p[2]) for p in pending)
    if len(out) == 1:
        x, y, r = out[0]
    else:
        x, y, r = (np.concatenate([o[i] for o in out]) for i in range(3))
    batch = (
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(np.ascontiguousarray(y)),
        torch.from_numpy(np.ascontiguousarray(r)),
    )
    return batch, pending, left


def _round_robin_skips(counts: list[int], consumed: int) -> tuple[list[int], int]:
    """How many batches each worker yielded among the first ``consumed`` of a DataLoader
    that takes one batch from each still-active worker in turn, and which worker is next."""
    skips = [0] * len(counts)
    left = consumed
    nxt = 0
    while left > 0 and any(skips[w] < counts[w] for w in range(len(counts))):
        if skips[nxt] < counts[nxt]:
            skips[nxt] += 1
            left -= 1
        nxt = (nxt + 1) % len(counts)
    return skips, nxt


# ---- depth augmentation: a spectrum as a shorter exposure would have recorded it -----------------


def shallower(
    flux: np.ndarray,
    ivar: np.ndarray,
    snr: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    snr_min: float = DEPTH_SNR_MIN,
    grid: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Store rows (normalised flux, ivar) with ``fraction`` of them re-observed at a lower S/N.

    Surveys record the same kinds of object at every depth, down to a median S/N of ~1 per
    pixel (BOSS's galaxies and quasars, LAMOST's faint stars), while a simulation's S/N
    follows its own magnitude model per class: the demo's SDSS-like quasars are fainter than
    its galaxies and stars, so without this a network can learn "noisy means quasar" and call
    real faint galaxies and stars quasars. A chosen row with median S/N ``snr`` (above
    ``snr_min``) gets a target S/N drawn log-uniformly from [snr_min, snr]; its noise is
    scaled by k = snr / target (``data.resample.scale_noise``: a k**2 times shorter
    sky-limited exposure, normalised again as the store does: over ``grid``'s scale bins
    when given). Returns float32 copies; the inputs are not changed.
    """
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    s = np.asarray(snr, dtype=np.float64)
    pick = (rng.random(s.size) < fraction) & np.isfinite(s) & (s > snr_min)
    target = np.exp(rng.uniform(np.log(snr_min), np.log(np.where(pick, s, 2.0 * snr_min))))  # unpicked: any span
    idx = np.flatnonzero(pick)
    if not idx.size:
        return flux, ivar
    f2, iv2 = scale_noise(flux[idx], ivar[idx], s[idx] / target[idx], rng, grid)
    flux, ivar = flux.copy(), ivar.copy()
    flux[idx], ivar[idx] = f2, iv2
    return flux, ivar


# ---- redshift augmentation: a quasar moved along the logarithmic grid ---------------------------


def redshift_shift_draws(z: np.ndarray, max_shift: int, log_step: float, z_max: float, rng: np.random.Generator) -> np.ndarray:
    """Whole-bin shifts (int64, one per ``z``) drawn uniformly from [-max_shift, max_shift],
    limited so that the shifted redshift stays in [0, z_max]."""
    lg = np.log10(1.0 + np.asarray(z, dtype=np.float64))
    lo = np.maximum(-max_shift, np.ceil(-lg / log_step - 1e-9)).astype(np.int64)
    hi = np.minimum(max_shift, np.floor((np.log10(1.0 + z_max) - lg) / log_step + 1e-9)).astype(np.int64)
    hi = np.maximum(hi, lo)
    return lo + np.floor(rng.random(lg.size) * (hi - lo + 1)).astype(np.int64)


def redshift_shift(x: torch.Tensor, z: torch.Tensor, shift: torch.Tensor, log_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectra ``x`` (B, C, n_bins) on the logarithmic grid as they would look at another redshift.

    On a grid uniform in log10(λ), observing a spectrum at (1+z') = (1+z)·10**(k·log_step)
    moves every feature by k bins (k > 0: redder). Bin i of the result is bin i - k of the
    input; bins that come from outside the grid hold 0, the store's "no data". The result is
    normalised again as the store normalises (``data.resample.normalise``): flux min-max
    scaled to [-1, 1] over its bins with data (non-zero), the second (ivar) channel divided by
    its maximum; so it is the store's row for that spectrum at z' over the narrower coverage.
    Returns (shifted x, z').
    """
    n = x.shape[-1]
    shift = shift.to(device=x.device, dtype=torch.long)
    src = torch.arange(n, device=x.device)[None, :] - shift[:, None]  # (B, n)
    inside = (src >= 0) & (src < n)
    idx = src.clamp(0, n - 1)[:, None, :].expand(-1, x.shape[1], -1)
    out = torch.where(inside[:, None, :], torch.gather(x, 2, idx), torch.zeros((), dtype=x.dtype, device=x.device))
    flux = out[:, 0]
    good = flux != 0
    big = torch.finfo(flux.dtype).max
    fmin = torch.where(good, flux, torch.full_like(flux, big)).amin(dim=1, keepdim=True)
    fmax = torch.where(good, flux, torch.full_like(flux, -big)).amax(dim=1, keepdim=True)
    span = fmax - fmin
    ok = good.any(dim=1, keepdim=True) & (span > 0)
    scaled = ((flux - fmin) * (2.0 / torch.where(ok, span, torch.ones_like(span))) - 1.0).clamp(-1.0, 1.0)
    out[:, 0] = torch.where(good & ok, scaled, torch.zeros_like(flux))
    if x.shape[1] == 2:
        peak = out[:, 1].amax(dim=1, keepdim=True)
        out[:, 1] = torch.where(peak > 0, out[:, 1] / torch.where(peak > 0, peak, torch.ones_like(peak)), out[:, 1])
    z_new = (1.0 + z.to(torch.float64)) * torch.pow(10.0, shift.to(torch.float64) * log_step) - 1.0
    return out, z_new.to(z.dtype)


def redshift_augment(
    x: torch.Tensor, z: torch.Tensor, max_shift: int, log_step: float, z_max: float, seed: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted copies (``redshift_shift``) of the rows of ``x`` with a finite redshift ``z``, each
    by its own random whole number of bins in [-max_shift, max_shift] (z' kept in [0, z_max]);
    the draws are a function of ``seed`` (anything ``np.random.default_rng`` takes)."""
    has = torch.isfinite(z)
    if max_shift <= 0 or not bool(has.any()):
        return x[:0], z[:0]
    zq = z[has]
    shifts = redshift_shift_draws(zq.double().cpu().numpy(), max_shift, log_step, z_max, np.random.default_rng(seed))
    return redshift_shift(x[has], zq, torch.from_numpy(shifts), log_step)
