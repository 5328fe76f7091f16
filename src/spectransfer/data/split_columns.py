"""The object-level split of :mod:`spectransfer.data.splits` on arrow and numpy columns, for a
whole survey's metadata at once.

:func:`spectransfer.data.splits.assign_splits` works on a pandas frame whose ids are Python
strings (~0.9 KB a spectrum at its peak: 8 GB for 9M spectra). Ingest splits every live spectrum
at the end of each run, so it uses this version: the same objects, object ids, splits, warnings
and leakage report, from ids kept as arrow strings and everything else as numpy arrays
(~0.2 KB a spectrum). The tests check the two agree.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from spectransfer.data.splits import (
    SPLITS,
    SplitConfig,
    _effective_fractions,
    chord_length,
    empty_split_warning,
    no_leakage,
    unit_hash,
    unit_vectors,
)

log = logging.getLogger(__name__)

HASH_BLOCK = 65536  # ids turned into Python strings at a time, to hash them
_TRAIN, _VAL, _TEST = (SPLITS.index(s) for s in ("train", "val", "test"))


def _hash(ids: pa.Array, seed: int, salt: str = "") -> np.ndarray:
    """:func:`unit_hash` of arrow strings, a block at a time."""
    out = np.empty(len(ids), dtype=np.float64)
    for a in range(0, len(ids), HASH_BLOCK):
        out[a : a + HASH_BLOCK] = unit_hash(ids.slice(a, HASH_BLOCK).to_pylist(), seed, salt)
    return out


def _ranks(strings: pa.Array) -> np.ndarray:
    """Rank of each string in sorted order (equal strings: distinct ranks, first occurrence lower)."""
    order = pc.sort_indices(strings).to_numpy()
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def _components(table: pa.Table, radius_arcsec: float) -> np.ndarray:
    """Component label per row, linked by same prior object id (a star around its first row) and
    by position within ``radius_arcsec`` (friends of friends): :func:`splits.group_objects`."""
    n = table.num_rows
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    prior = table.column("object_id").combine_chunks().dictionary_encode()
    codes = prior.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    present = np.flatnonzero(prior.indices.is_valid().to_numpy(zero_copy_only=False))
    if present.size:
        _, first = np.unique(codes[present], return_index=True)
        star = np.full(len(prior.dictionary), -1, dtype=np.int64)
        star[np.unique(codes[present])] = present[first]
        rows.append(present)
        cols.append(star[codes[present]])
    del prior, codes
    ra = table.column("ra").to_numpy().astype(np.float64)
    dec = table.column("dec").to_numpy().astype(np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec)
    if radius_arcsec > 0 and ok.sum() > 1:
        idx = np.flatnonzero(ok)
        tree = cKDTree(unit_vectors(ra[ok], dec[ok]))
        pairs = tree.query_pairs(chord_length(radius_arcsec), output_type="ndarray")
        del tree
        if len(pairs):
            rows.append(idx[pairs[:, 0]])
            cols.append(idx[pairs[:, 1]])
    if not rows:
        return np.arange(n, dtype=np.int64)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _object_ids(table: pa.Table, labels: np.ndarray) -> pa.Array:
    """Per row its object's id: the component's smallest prior object id, else 'obj-' + its smallest spectrum id."""
    n_comp = int(labels.max()) + 1 if len(labels) else 0
    sid_rank = _ranks(table.column("spectrum_id").combine_chunks())
    best = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, labels, sid_rank)
    inverse = np.empty(len(sid_rank), dtype=np.int64)
    inverse[sid_rank] = np.arange(len(sid_rank))
    fresh_rows = inverse[best]
    del sid_rank, inverse
    ids = pc.binary_join_element_wise("obj-", table.column("spectrum_id").combine_chunks().take(pa.array(fresh_rows)), "")
    prior = table.column("object_id").combine_chunks()
    rows = np.flatnonzero(prior.is_valid().to_numpy(zero_copy_only=False))
    if rows.size:
        valid = prior.take(pa.array(rows))
        order = pc.sort_indices(valid).to_numpy()
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        pbest = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(pbest, labels[rows], rank)
        has = pbest < np.iinfo(np.int64).max
        smallest = valid.take(pa.array(order[np.where(has, pbest, 0)]))
        ids = pc.if_else(pa.array(has), smallest, ids)
    return ids.take(pa.array(labels))


def _survey_split(counts: np.ndarray, u: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, bool, float, float]:
    """Split code per object of one survey (objects with ``counts`` spectra, hashes ``u``), as assign_splits."""
    use_sizes, fv, ft = _effective_fractions(int(counts.sum()), cfg)
    out = np.full(len(u), _TRAIN, dtype=np.int8)
    if use_sizes:
        order = np.argsort(u, kind="stable")
        c = counts[order]
        is_test = (np.cumsum(c) - c) < cfg.test_size
        rest = c[~is_test]
        is_val = (np.cumsum(rest) - rest) < cfg.val_size
        out[order[is_test]] = _TEST
        out[order[~is_test][is_val]] = _VAL
    else:
        out[u < ft + fv] = _VAL
        out[u < ft] = _TEST
    return out, use_sizes, fv, ft


def assign_split_columns(table: pa.Table, cfg: SplitConfig = SplitConfig()) -> tuple[pa.Array, np.ndarray, dict[str, Any]]:
    """(object id per row, split per row as an index into SPLITS, report) for a table with the
    columns spectrum_id, survey, ra, dec, object_id: what :func:`assign_splits` gives for them."""
    import pandas as pd

    n = table.num_rows
    report: dict[str, Any] = {"config": cfg.to_dict(), "by_survey": {}}
    if n == 0:
        report["leakage"] = no_leakage()
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int8), report
    table = pa.table(
        {
            "spectrum_id": table.column("spectrum_id").cast(pa.string()),
            "object_id": table.column("object_id").cast(pa.string()),
            "ra": table.column("ra").cast(pa.float64()),
            "dec": table.column("dec").cast(pa.float64()),
            "survey": table.column("survey").cast(pa.string()),
        }
    )
    object_id = _object_ids(table, _components(table, cfg.radius_arcsec))
    enc = object_id.dictionary_encode()
    obj = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = enc.dictionary
    n_obj = len(names)
    survey = table.column("survey").combine_chunks().fill_null("(none)").dictionary_encode()
    scode = survey.indices.to_numpy(zero_copy_only=False)
    split = np.zeros(n, dtype=np.int8)
    obj_split = np.zeros(n_obj, dtype=np.int8)
    for k in np.argsort(survey.dictionary.to_pylist(), kind="stable"):
        name = survey.dictionary[int(k)].as_py()
        mine = scode == k
        counts = np.bincount(obj[mine], minlength=n_obj)
        objs = np.flatnonzero(counts)  # this survey's objects, in id-code order
        objs = objs[pc.sort_indices(names.take(pa.array(objs))).to_numpy()]  # by id, as groupby orders them
        u = _hash(names.take(pa.array(objs)), cfg.seed)
        codes, use_sizes, fv, ft = _survey_split(counts[objs], u, cfg)
        obj_split[objs] = codes
        split[mine] = obj_split[obj[mine]]
        report["by_survey"][str(name)] = {"mode": "sizes" if use_sizes else "fractions", "val_fraction": fv, "test_fraction": ft}
        as_series = pd.Series(np.asarray(SPLITS, dtype=object)[codes])
        warning = empty_split_warning(str(name), int(mine.sum()), as_series, pd.Series(u), fv, ft)
        if warning:
            log.warning("%s", warning)
            report.setdefault("warnings", []).append(warning)
    report["leakage"] = _leakage(table, obj, n_obj, scode, survey.dictionary, cfg)
    return object_id, split, report


def _leakage(
    table: pa.Table, obj: np.ndarray, n_obj: int, scode: np.ndarray, surveys: pa.Array, cfg: SplitConfig
) -> dict[str, int]:
    """What a per-spectrum random split with the same fractions would leak (:func:`splits.leakage_report`)."""
    sizes = np.bincount(obj, minlength=n_obj)
    sids = table.column("spectrum_id").combine_chunks()
    per_spec = np.zeros(len(obj), dtype=np.int8)
    for k in range(len(surveys)):
        mine = np.flatnonzero(scode == k)
        _, fv, ft = _effective_fractions(len(mine), cfg)
        u = _hash(sids.take(pa.array(mine)), cfg.seed, salt="spectrum")
        per_spec[mine] = np.where(u < ft, _TEST, np.where(u < ft + fv, _VAL, _TRAIN))
    seen = np.zeros(n_obj, dtype=np.int8)
    np.bitwise_or.at(seen, obj, (1 << per_spec).astype(np.int8))
    n_splits = ((seen[:, None] >> np.arange(3)) & 1).sum(axis=1)[obj]
    has_train = ((seen >> _TRAIN) & 1).astype(bool)[obj]
    size = sizes[obj]
    return {
        "repeat_objects": int((sizes > 1).sum()),
        "repeat_spectra": int((size > 1).sum()),
        "leaked_per_spectrum_split": int((n_splits > 1).sum()),
        "eval_spectra_with_train_twin": int(((per_spec != _TRAIN) & has_train & (size > 1)).sum()),
    }
