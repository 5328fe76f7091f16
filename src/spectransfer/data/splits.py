"""Object-level train/validation/test splits, so repeat spectra of one object never straddle splits.

The original work split spectra at random, one by one: repeat observations of a quasar could
sit in train and in test at once. Here spectra are first grouped into objects (same catalogue
id, or within 1.5 arcsec of each other, transitively: friends of friends), then each object is
assigned a split by a hash of its id and a seed, so the split is deterministic and does not
depend on the order of files or on the machine.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How spectra are split; saved in store.json so a later ingest splits the same way.

    Surveys with more than ``size_threshold`` spectra get the paper's absolute sizes
    (``val_size``, ``test_size`` spectra, rounded to whole objects); smaller ones the fractions.
    """

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    val_size: int = 50_000
    test_size: int = 100_000
    size_threshold: int = 1_000_000
    radius_arcsec: float = 1.5

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val/test fractions must be in [0, 1) and sum below 1, got {self.val_fraction}, {self.test_fraction}"
            )
        if self.val_size < 0 or self.test_size < 0 or self.radius_arcsec < 0:
            raise ValueError("split sizes and radius must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def unit_hash(keys: pd.Series | list[str], seed: int, salt: str = "") -> np.ndarray:
    """Map each string to [0, 1) by blake2b(seed, salt, key): stable across machines and runs."""
    prefix = f"{seed}:{salt}:".encode()
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(prefix + str(key).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """(N, 3) unit vectors of sky positions in degrees: a KD-tree over them finds close pairs,
    with Euclidean distance the chord of the angular separation (:func:`chord_length`)."""
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    cos_dec = np.cos(dec_r)
    return np.column_stack([cos_dec * np.cos(ra_r), cos_dec * np.sin(ra_r), np.sin(dec_r)])


def chord_length(radius_arcsec: float) -> float:
    """Distance between unit vectors ``radius_arcsec`` apart on the sky."""
    return float(2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0))


def group_objects(meta: pd.DataFrame, radius_arcsec: float = 1.5) -> np.ndarray:
    """Component label per spectrum: linked by same catalogue id, same prior object id, or position.

    Positions are linked friends-of-friends: two spectra within ``radius_arcsec`` join, and
    links are transitive (a KD-tree over unit vectors finds all close pairs at once).
    """
    n = len(meta)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []

    # Spectra sharing a key (catalogue id; object id given by an earlier ingest) form a star
    # around the key's first spectrum.
    for key in ("catalog_id", "object_id"):
        if key not in meta.columns:
            continue
        values = meta[key]
        present = values.notna().to_numpy()
        if not present.any():
            continue
        idx = np.flatnonzero(present)
        codes, _ = pd.factorize(values.iloc[idx].astype(str))
        first = pd.Series(idx).groupby(codes).transform("first").to_numpy()
        rows.append(idx)
        cols.append(first)

    if radius_arcsec > 0 and {"ra", "dec"} <= set(meta.columns):
        ra = pd.to_numeric(meta["ra"], errors="coerce").to_numpy(dtype=np.float64)
        dec = pd.to_numeric(meta["dec"], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(ra) & np.isfinite(dec)
        if ok.sum() > 1:
            idx = np.flatnonzero(ok)
            tree = cKDTree(unit_vectors(ra[ok], dec[ok]))
            pairs = tree.query_pairs(chord_length(radius_arcsec), output_type="ndarray")
            if len(pairs):
                rows.append(idx[pairs[:, 0]])
                cols.append(idx[pairs[:, 1]])

    if not rows:
        return np.arange(n, dtype=np.int64)
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def _object_ids(meta: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
    """One id per component: its smallest earlier object id if any, else its smallest spectrum id.

    Keeping earlier ids means appending spectra never renames (and so never re-splits) an
    existing object unless a new spectrum bridges two of them.
    """
    frame = pd.DataFrame({"label": labels, "spectrum_id": meta["spectrum_id"].astype(str).to_numpy()})
    if "object_id" in meta.columns:
        frame["prior"] = meta["object_id"].to_numpy()
    else:
        frame["prior"] = None
    prior = frame.dropna(subset=["prior"]).groupby("label")["prior"].min()
    fresh = "obj-" + frame.groupby("label")["spectrum_id"].min()
    ids = fresh.copy()
    ids.loc[prior.index] = prior.astype(str)
    return ids.reindex(labels).to_numpy(dtype=object)


def _split_by_fraction(u: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    out = np.full(len(u), "train", dtype=object)
    out[u < test_fraction + val_fraction] = "val"
    out[u < test_fraction] = "test"
    return out


def _effective_fractions(n: int, cfg: SplitConfig) -> tuple[bool, float, float]:
    """(uses sizes, val fraction, test fraction) for a survey of ``n`` spectra."""
    if n > cfg.size_threshold:
        return True, min(cfg.val_size / n, 0.5), min(cfg.test_size / n, 0.5)
    return False, cfg.val_fraction, cfg.test_fraction


def no_leakage() -> dict[str, int]:
    """The leakage report of a survey with no spectra."""
    return {"repeat_objects": 0, "repeat_spectra": 0, "leaked_per_spectrum_split": 0, "eval_spectra_with_train_twin": 0}


def assign_splits(meta: pd.DataFrame, cfg: SplitConfig = SplitConfig()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Return ``meta`` with ``object_id`` and ``split`` set, and a report of what was done.

    Splits are made per survey (each survey is trained and evaluated on its own). The report
    counts objects with several spectra and how many spectra a per-spectrum random split with
    the same fractions would have leaked (spectra whose object has members in another split).
    """
    meta = meta.copy().reset_index(drop=True)
    n = len(meta)
    labels = group_objects(meta, cfg.radius_arcsec)
    meta["object_id"] = _object_ids(meta, labels)
    meta["split"] = None
    report: dict[str, Any] = {"config": cfg.to_dict(), "by_survey": {}}
    if n == 0:
        report["leakage"] = no_leakage()
        return meta, report

    survey = meta["survey"].fillna("(none)").astype(str) if "survey" in meta.columns else pd.Series(["(none)"] * n)
    for name, idx in survey.groupby(survey).groups.items():
        idx = np.asarray(idx)
        part = meta.loc[idx]
        use_sizes, fv, ft = _effective_fractions(len(part), cfg)
        objects = part.groupby("object_id").size()
        u_obj = pd.Series(unit_hash(list(objects.index), cfg.seed), index=objects.index)
        if use_sizes:
            # Whole objects in hash order until the paper's spectrum counts are reached.
            order = u_obj.sort_values(kind="stable").index
            counts = objects.reindex(order)
            is_test = (counts.cumsum() - counts).to_numpy() < cfg.test_size
            rest = counts[~is_test]
            is_val = (rest.cumsum() - rest).to_numpy() < cfg.val_size
            obj_split = pd.Series("train", index=order, dtype=object)
            obj_split[is_test] = "test"
            obj_split[rest.index[is_val]] = "val"
        else:
            obj_split = pd.Series(_split_by_fraction(u_obj.to_numpy(), fv, ft), index=u_obj.index)
        meta.loc[idx, "split"] = obj_split.reindex(part["object_id"]).to_numpy()
        report["by_survey"][str(name)] = {"mode": "sizes" if use_sizes else "fractions", "val_fraction": fv, "test_fraction": ft}
        warning = empty_split_warning(str(name), len(part), obj_split, u_obj, fv, ft)
        if warning:
            log.warning("%s", warning)
            report.setdefault("warnings", []).append(warning)

    report["leakage"] = leakage_report(meta, cfg)
    straddling = int((meta.groupby("object_id")["split"].nunique() > 1).sum())
    if straddling:  # cannot happen by construction; guard the invariant loudly
        raise AssertionError(f"{straddling} objects straddle splits")
    return meta, report


def _next_step_above(x: float, step: float = 0.01) -> float:
    """The smallest multiple of ``step`` strictly above ``x``."""
    return round((np.floor(x / step + 1e-9) + 1) * step, 6)


def empty_split_warning(survey: str, n_spectra: int, obj_split: pd.Series, u_obj: pd.Series, fv: float, ft: float) -> str | None:
    """One line naming the empty splits of a survey and the options that fill them, or None.

    ``train`` needs val spectra (early stopping) and ``evaluate`` test spectra. The suggested
    fractions are the smallest multiples of 0.01 that put at least one object of this survey's
    hashes in test and in val (test is taken first, val is the next window of the hash).
    """
    have = set(obj_split.to_numpy())
    empty = [s for s in SPLITS if s not in have]
    if not empty:
        return None
    n_obj = len(obj_split)
    head = f"{survey}: split {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty ({n_spectra} spectra in {n_obj} objects, val fraction {fv:g}, test fraction {ft:g})"
    if n_obj < 3:
        return f"{head}; three splits need at least 3 objects: add spectra"
    if "train" in empty:
        return f"{head}; lower --val-fraction / --test-fraction (ingest again with --resplit), or add spectra"
    u = np.sort(u_obj.to_numpy())
    new_ft = ft if "test" not in empty else _next_step_above(u[0])
    above = u[u >= new_ft]
    new_fv = fv if (above.size and above[0] < new_ft + fv) else (_next_step_above(above[0] - new_ft) if above.size else 1.0)
    if new_ft + new_fv >= 1 or (u >= new_ft + new_fv).sum() == 0:
        return f"{head}; too few objects for three splits at any fractions: add spectra"
    opts = [f"--test-fraction {new_ft:g}"] * bool(new_ft != ft) + [f"--val-fraction {new_fv:g}"] * bool(new_fv != fv)
    return f"{head}; `train` needs val and `evaluate` test spectra: ingest again with --resplit {' '.join(opts)}, or add spectra"


def leakage_report(meta: pd.DataFrame, cfg: SplitConfig) -> dict[str, int]:
    """What a per-spectrum random split (the original's) with the same fractions would leak."""
    n = len(meta)
    sizes = meta.groupby("object_id")["object_id"].transform("size").to_numpy()
    per_spec = np.empty(n, dtype=object)
    survey = meta["survey"].fillna("(none)").astype(str) if "survey" in meta.columns else pd.Series(["(none)"] * n)
    for _, idx in survey.groupby(survey).groups.items():
        idx = np.asarray(idx)
        _, fv, ft = _effective_fractions(len(idx), cfg)
        per_spec[idx] = _split_by_fraction(unit_hash(list(meta["spectrum_id"].iloc[idx]), cfg.seed, salt="spectrum"), fv, ft)
    frame = pd.DataFrame({"object_id": meta["object_id"].to_numpy(), "split": per_spec})
    n_splits = frame.groupby("object_id")["split"].transform("nunique").to_numpy()
    has_train = frame.assign(t=frame["split"] == "train").groupby("object_id")["t"].transform("any").to_numpy()
    return {
        "repeat_objects": int((meta.groupby("object_id").size() > 1).sum()),
        "repeat_spectra": int((sizes > 1).sum()),
        "leaked_per_spectrum_split": int((n_splits > 1).sum()),
        "eval_spectra_with_train_twin": int(((per_spec != "train") & has_train & (sizes > 1)).sum()),
    }
