"""The object-level split of :mod:`spectransfer.data.splits` for a whole survey's metadata, in a
few bytes a spectrum: the columns are read block by block (from a parquet file or a table) and
only compact numpy arrays per row are kept.

:func:`spectransfer.data.splits.assign_splits` works on a pandas frame whose ids are Python
strings (~0.9 KB a spectrum at its peak: 8 GB for 9M spectra); an arrow version that held the
id columns, their copies and their sorted ranks grew by ~0.34 KB a spectrum (313 MB at 195,620
rows, 912 MB at 1,956,200). Here what stays per row is a survey code, an 8-byte hash of its
object id and its split; sky positions (as unit vectors) and the KD-tree live only while close
pairs are found. Strings are fetched only for the rows that need them: those linked to another
(repeats, shared prior object ids), and in the paper's absolute-size mode the objects near the
val/test cut. Ingest's split and meta.parquet rewrite together: 327 MB peak at 195,620 rows, 369
MB at 1,956,200 (~24 bytes a spectrum).

A row's object id is its prior object id, else 'obj-' + its spectrum id, unless it is linked to
other rows: then it is the smallest prior object id of its component, else 'obj-' + the
component's smallest spectrum id (what :func:`splits.assign_splits` gives). The tests check
the two agree.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from spectransfer.data.ledger import parquet_batches
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

HASH_BLOCK = 65536  # rows read (and turned into Python strings to hash) at a time
CHUNK = 1 << 20  # rows of the per-row arrays worked on at a time (a few bytes a row each)
_TRAIN, _VAL, _TEST = (SPLITS.index(s) for s in ("train", "val", "test"))
_TYPES = {"spectrum_id": pa.string(), "object_id": pa.string(), "survey": pa.string(), "ra": pa.float64(), "dec": pa.float64()}

# Source of the input columns: blocks of the named columns, in row order.
Blocks = Callable[[Sequence[str]], Iterator[pa.RecordBatch]]


def table_blocks(table: pa.Table, block: int = HASH_BLOCK) -> Blocks:
    """A table's columns, ``block`` rows at a time."""
    return lambda cols: iter(table.select(list(cols)).to_batches(max_chunksize=block))


def parquet_column_blocks(path: Path, block: int = HASH_BLOCK) -> Blocks:
    """A parquet file's columns, ``block`` rows at a time (one row group's worth of memory)."""
    return lambda cols: parquet_batches(path, block, cols)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name)).cast(_TYPES[name])


def _blocks(source: Blocks, cols: Sequence[str]) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    """(first row, {column: array}) per block."""
    a = 0
    for batch in source(cols):
        yield a, {c: _column(batch, c) for c in cols}
        a += batch.num_rows


def _digests(strings: list[Any], prefix: bytes) -> np.ndarray:
    """blake2b(prefix + string) as uint64: :func:`splits.unit_hash` is this over 2**64."""
    out = np.empty(len(strings), dtype=np.uint64)
    for i, s in enumerate(strings):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + str(s).encode(), digest_size=8).digest(), "big")
    return out


def _unit(keys: np.ndarray) -> np.ndarray:
    """The [0, 1) hash of :func:`splits.unit_hash` from its uint64 digest (both correctly rounded)."""
    return keys.astype(np.float64) / 2.0**64


def _chunks(n: int) -> Iterator[slice]:
    return (slice(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK))


def _fraction_codes(u: np.ndarray, fv: float, ft: float) -> np.ndarray:
    """Split code per hash: test below ``ft``, val below ``ft + fv``, else train."""
    out = np.full(len(u), _TRAIN, dtype=np.int8)
    out[u < ft + fv] = _VAL
    out[u < ft] = _TEST
    return out


def _take(source: Blocks, cols: Sequence[str], rows: np.ndarray) -> dict[str, pa.Array]:
    """The columns at ``rows`` (sorted row numbers), read block by block."""
    parts: dict[str, list[pa.Array]] = {c: [] for c in cols}
    for a, block in _blocks(source, cols):
        lo, hi = np.searchsorted(rows, [a, a + len(block[cols[0]])])
        if hi > lo:
            at = pa.array(rows[lo:hi] - a)
            for c in cols:
                parts[c].append(block[c].take(at))
    return {c: pa.concat_arrays(v) if v else pa.array([], _TYPES[c]) for c, v in parts.items()}


@dataclass
class _Scan:
    """What one pass over survey, ra, dec and object_id keeps: a code per row and the links."""

    n: int
    survey_names: list[str]
    survey_code: np.ndarray  # int16 per row
    edges: tuple[np.ndarray, np.ndarray]  # linked row pairs (same prior object id, or close on the sky)


def _scan(source: Blocks, n: int, radius_arcsec: float) -> _Scan:
    names: dict[str, int] = {}
    code = np.empty(n, dtype=np.int16)
    uv = np.empty((n, 3), dtype=np.float64)  # unit vectors of the rows with a position, packed
    idx = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)  # their rows
    w = 0
    prior_rows: list[np.ndarray] = []
    prior_keys: list[np.ndarray] = []
    for a, block in _blocks(source, ["survey", "ra", "dec", "object_id"]):
        b = a + len(block["ra"])
        enc = block["survey"].fill_null("(none)").dictionary_encode()
        lut = np.array([names.setdefault(s, len(names)) for s in enc.dictionary.to_pylist()], dtype=np.int16)
        code[a:b] = lut[enc.indices.to_numpy(zero_copy_only=False)] if len(lut) else 0
        ra = block["ra"].to_numpy(zero_copy_only=False)
        dec = block["dec"].to_numpy(zero_copy_only=False)
        ok = np.isfinite(ra) & np.isfinite(dec)
        k = int(ok.sum())
        uv[w : w + k] = unit_vectors(ra[ok], dec[ok])
        idx[w : w + k] = np.flatnonzero(ok) + a
        w += k
        valid = block["object_id"].is_valid().to_numpy(zero_copy_only=False)
        if valid.any():
            rows = np.flatnonzero(valid)
            prior_rows.append(rows + a)
            prior_keys.append(_digests(block["object_id"].take(pa.array(rows)).to_pylist(), b""))
    edges = [_prior_edges(source, np.concatenate(prior_rows), np.concatenate(prior_keys))] if prior_rows else []
    if radius_arcsec > 0 and w > 1:
        pairs = cKDTree(uv[:w]).query_pairs(chord_length(radius_arcsec), output_type="ndarray")
        edges.append((idx[pairs[:, 0]], idx[pairs[:, 1]]))
    del uv, idx
    r = np.concatenate([e[0] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    c = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    return _Scan(n, list(names), code, (r.astype(np.int64), c.astype(np.int64)))


def _prior_edges(source: Blocks, rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sharing a prior object id, as a star around each id's first row: candidates by an
    8-byte hash, confirmed on the strings themselves."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    same = np.zeros(len(k), dtype=bool)
    same[1:] = k[1:] == k[:-1]
    same[:-1] |= same[1:]
    cand = np.sort(rows[order[same]])
    if not len(cand):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    prior = _take(source, ["object_id"], cand)["object_id"].to_numpy(zero_copy_only=False)
    codes, _ = pd.factorize(prior)
    first = pd.Series(cand).groupby(codes).transform("first").to_numpy()
    return cand, first


@dataclass
class ObjectIds:
    """Object id per row: the row's own (prior id, else 'obj-' + spectrum id) unless it is one of
    ``rows`` (sorted; linked to other rows), whose ids are ``ids``."""

    rows: np.ndarray
    ids: pa.Array

    def block(self, start: int, spectrum_id: pa.Array, prior: pa.Array) -> pa.Array:
        """The object ids of rows start .. start + len(spectrum_id), from those rows' own columns."""
        sid, prior = spectrum_id.cast(pa.string()), prior.cast(pa.string())
        own = pc.if_else(prior.is_valid(), prior, pc.binary_join_element_wise("obj-", sid, ""))
        lo, hi = np.searchsorted(self.rows, [start, start + len(sid)])
        if hi == lo:
            return own
        mask = np.zeros(len(sid), dtype=bool)
        mask[self.rows[lo:hi] - start] = True
        return pc.replace_with_mask(own, pa.array(mask), self.ids.slice(lo, hi - lo))

    def of_rows(self, source: Blocks, rows: np.ndarray) -> pa.Array:
        """The object ids of ``rows`` (sorted), read block by block."""
        cols = _take(source, ["spectrum_id", "object_id"], rows)
        prior = cols["object_id"]
        out = pc.if_else(prior.is_valid(), prior, pc.binary_join_element_wise("obj-", cols["spectrum_id"], ""))
        if not len(self.rows) or not len(rows):
            return out
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        hit = self.rows[at] == rows
        if hit.any():
            out = pc.replace_with_mask(out, pa.array(hit), self.ids.take(pa.array(at[hit])))
        return out

    def iter_blocks(self, source: Blocks) -> Iterator[pa.Array]:
        for a, block in _blocks(source, ["spectrum_id", "object_id"]):
            yield self.block(a, block["spectrum_id"], block["object_id"])


def _linked_ids(source: Blocks, scan: _Scan) -> ObjectIds:
    """Components of the linked rows (friends of friends) and the object id of each."""
    r, c = scan.edges
    nodes = np.unique(np.concatenate([r, c]))
    if not len(nodes):
        return ObjectIds(nodes, pa.array([], pa.string()))
    m = len(nodes)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (np.searchsorted(nodes, r), np.searchsorted(nodes, c))), shape=(m, m))
    label = connected_components(graph, directed=False)[1]
    cols = _take(source, ["spectrum_id", "object_id"], nodes)
    frame = pd.DataFrame(
        {
            "label": label,
            "sid": cols["spectrum_id"].to_numpy(zero_copy_only=False),
            "prior": cols["object_id"].to_numpy(zero_copy_only=False),
        }
    )
    prior = frame.dropna(subset=["prior"]).groupby("label")["prior"].min()
    ids = "obj-" + frame.groupby("label")["sid"].min()
    ids.loc[prior.index] = prior
    return ObjectIds(nodes, pa.array(ids.reindex(label).to_numpy(dtype=object), pa.string()))


@dataclass
class _Objects:
    """Objects as hashes per row; the rows whose object has other rows (or whose hash does) as exact groups."""

    keys: np.ndarray  # uint64 per row: blake2b(seed, object id), the split hash
    multi_rows: np.ndarray  # sorted rows sharing their hash with another row
    multi_obj: np.ndarray  # their object (exact, by id string), 0 .. n_multi - 1
    multi_ids: list[str]  # id of each of those objects
    multi_keys: np.ndarray  # and its hash


def _objects(source: Blocks, n: int, ids: ObjectIds, seed: int) -> _Objects:
    keys = np.empty(n, dtype=np.uint64)
    prefix = f"{seed}::".encode()
    a = 0
    for block in ids.iter_blocks(source):
        keys[a : a + len(block)] = _digests(block.to_pylist(), prefix)
        a += len(block)
    s = np.sort(keys)
    dup = np.unique(s[1:][s[1:] == s[:-1]])
    del s
    rows = np.concatenate([_rows_in(keys[c], dup) + c.start for c in _chunks(n)]) if len(dup) else np.zeros(0, dtype=np.int64)
    names = ids.of_rows(source, rows).to_numpy(zero_copy_only=False)
    obj, uniq = pd.factorize(names)
    obj = obj.astype(np.int64)
    mkeys = np.zeros(len(uniq), dtype=np.uint64)
    mkeys[obj] = keys[rows]
    return _Objects(keys, rows, obj, list(uniq), mkeys)


def _rows_in(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Positions of the ``keys`` that are among ``values`` (sorted, not empty)."""
    return np.flatnonzero(values[np.minimum(np.searchsorted(values, keys), len(values) - 1)] == keys)


def split_columns(source: Blocks, n: int, cfg: SplitConfig = SplitConfig()) -> tuple[ObjectIds, np.ndarray, dict[str, Any]]:
    """(object ids, split per row as an index into SPLITS, report) of the ``n`` rows that
    ``source`` yields (columns spectrum_id, survey, ra, dec, object_id): what
    :func:`splits.assign_splits` gives for them."""
    report: dict[str, Any] = {"config": cfg.to_dict(), "by_survey": {}}
    if n == 0:
        report["leakage"] = no_leakage()
        return ObjectIds(np.zeros(0, dtype=np.int64), pa.array([], pa.string())), np.zeros(0, dtype=np.int8), report
    scan = _scan(source, n, cfg.radius_arcsec)
    ids = _linked_ids(source, scan)
    objs = _objects(source, n, ids, cfg.seed)
    split = np.full(n, _TRAIN, dtype=np.int8)
    in_multi = np.zeros(n, dtype=bool)
    in_multi[objs.multi_rows] = True
    for k in np.argsort(scan.survey_names, kind="stable"):
        name = scan.survey_names[int(k)]
        mine = scan.survey_code == k
        use_sizes, fv, ft = _effective_fractions(int(mine.sum()), cfg)
        if use_sizes:
            _split_by_sizes(source, ids, objs, mine, in_multi, split, cfg)
        else:
            for c in _chunks(n):
                m = mine[c]
                split[c][m] = _fraction_codes(_unit(objs.keys[c][m]), fv, ft)
        report["by_survey"][name] = {"mode": "sizes" if use_sizes else "fractions", "val_fraction": fv, "test_fraction": ft}
        warning = _warning(name, objs, mine, split, fv, ft)
        if warning:
            log.warning("%s", warning)
            report.setdefault("warnings", []).append(warning)
    report["leakage"] = _leakage(source, scan, objs, cfg)
    return ids, split, report


def _split_by_sizes(
    source: Blocks, ids: ObjectIds, objs: _Objects, mine: np.ndarray, in_multi: np.ndarray, split: np.ndarray, cfg: SplitConfig
) -> None:
    """Whole objects in hash order (ties by id) until the paper's spectrum counts are reached: only
    the objects below a hash bound that holds both cuts are ordered (the rest are train)."""
    pos = np.flatnonzero(mine[objs.multi_rows])
    counts = np.bincount(objs.multi_obj[pos], minlength=len(objs.multi_ids))
    multi = np.flatnonzero(counts)
    u_multi = _unit(objs.multi_keys[multi])
    total = int(mine.sum())
    bound = min(1.0, 1.25 * (cfg.test_size + cfg.val_size + 1) / max(total, 1))
    while True:
        singles = _single_rows_below(objs, mine, in_multi, bound)
        cm = u_multi < bound
        names = pa.concat_arrays([ids.of_rows(source, singles), pa.array([objs.multi_ids[i] for i in multi[cm]], pa.string())])
        u = np.concatenate([_unit(objs.keys[singles]), u_multi[cm]])
        count = np.concatenate([np.ones(len(singles), dtype=np.int64), counts[multi[cm]]])
        order = pc.sort_indices(pa.table({"u": u, "id": names}), sort_keys=[("u", "ascending"), ("id", "ascending")]).to_numpy()
        c = count[order]
        is_test = (np.cumsum(c) - c) < cfg.test_size
        rest = c[~is_test]
        is_val = (np.cumsum(rest) - rest) < cfg.val_size
        if bound >= 1.0 or (c.sum() >= cfg.test_size and rest.sum() >= cfg.val_size):
            break
        bound = min(1.0, bound * 1.5)
    code = np.full(len(u), _TRAIN, dtype=np.int8)
    code[order[is_test]] = _TEST
    code[order[~is_test][is_val]] = _VAL
    split[mine] = _TRAIN
    split[singles] = code[: len(singles)]
    obj_code = np.full(len(objs.multi_ids), _TRAIN, dtype=np.int8)
    obj_code[multi[cm]] = code[len(singles) :]
    split[objs.multi_rows[pos]] = obj_code[objs.multi_obj[pos]]


def _single_rows_below(objs: _Objects, mine: np.ndarray, in_multi: np.ndarray, bound: float) -> np.ndarray:
    """The survey's rows that are objects of their own, with a hash below ``bound`` (all at bound 1)."""
    out = []
    for c in _chunks(len(mine)):
        m = mine[c] & ~in_multi[c]
        if bound < 1.0:
            m &= _unit(objs.keys[c]) < bound
        out.append(np.flatnonzero(m) + c.start)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _warning(name: str, objs: _Objects, mine: np.ndarray, split: np.ndarray, fv: float, ft: float) -> str | None:
    """:func:`splits.empty_split_warning` for one survey (its per-object series built only when a split is empty)."""
    if (np.bincount(split[mine], minlength=len(SPLITS)) > 0).all():
        return None
    pos = np.flatnonzero(mine[objs.multi_rows])
    row_of = np.full(len(objs.multi_ids), -1, dtype=np.int64)
    row_of[objs.multi_obj[pos]] = objs.multi_rows[pos]
    singles = np.setdiff1d(np.flatnonzero(mine), objs.multi_rows, assume_unique=True)
    rows = np.concatenate([singles, row_of[row_of >= 0]])
    obj_split = pd.Series(np.asarray(SPLITS, dtype=object)[split[rows]])
    return empty_split_warning(name, int(mine.sum()), obj_split, pd.Series(_unit(objs.keys[rows])), fv, ft)


def _leakage(source: Blocks, scan: _Scan, objs: _Objects, cfg: SplitConfig) -> dict[str, int]:
    """What a per-spectrum random split with the same fractions would leak (:func:`splits.leakage_report`):
    only rows whose object has other rows can leak, so only their spectrum ids are hashed."""
    rows = objs.multi_rows
    n_obj = len(objs.multi_ids)
    sizes = np.bincount(objs.multi_obj, minlength=n_obj)
    per_spec = np.zeros(len(rows), dtype=np.int8)
    sids = _take(source, ["spectrum_id"], rows)["spectrum_id"]
    codes = scan.survey_code[rows]
    for k in range(len(scan.survey_names)):
        mine = np.flatnonzero(codes == k)
        if not len(mine):
            continue
        _, fv, ft = _effective_fractions(int((scan.survey_code == k).sum()), cfg)
        u = unit_hash(sids.take(pa.array(mine)).to_pylist(), cfg.seed, salt="spectrum")
        per_spec[mine] = np.where(u < ft, _TEST, np.where(u < ft + fv, _VAL, _TRAIN))
    seen = np.zeros(n_obj, dtype=np.int8)
    np.bitwise_or.at(seen, objs.multi_obj, (1 << per_spec).astype(np.int8))
    n_splits = ((seen[:, None] >> np.arange(3)) & 1).sum(axis=1)[objs.multi_obj]
    has_train = ((seen >> _TRAIN) & 1).astype(bool)[objs.multi_obj]
    size = sizes[objs.multi_obj]
    return {
        "repeat_objects": int((sizes > 1).sum()),
        "repeat_spectra": int((size > 1).sum()),
        "leaked_per_spectrum_split": int(((n_splits > 1) & (size > 1)).sum()),
        "eval_spectra_with_train_twin": int(((per_spec != _TRAIN) & has_train & (size > 1)).sum()),
    }


def assign_split_columns(table: pa.Table, cfg: SplitConfig = SplitConfig()) -> tuple[pa.Array, np.ndarray, dict[str, Any]]:
    """(object id per row, split per row as an index into SPLITS, report) for a table with the
    columns spectrum_id, survey, ra, dec, object_id: what :func:`assign_splits` gives for them."""
    source = table_blocks(table)
    ids, split, report = split_columns(source, table.num_rows, cfg)
    blocks = list(ids.iter_blocks(source))
    return (pa.concat_arrays(blocks) if blocks else pa.array([], pa.string())), split, report
