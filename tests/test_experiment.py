"""The experiment's docs output: both figures with the JSON behind each, no machine paths, nothing else touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spectransfer.evaluation.experiment import DATA, FIGURES, answers, portable, write_docs


def _cells(f1: dict[str, list[list[float]]], fractions: tuple[float, ...]) -> list[dict]:
    return [
        {"mode": m, "fraction": f, "seed": s, "status": "done", "n_train_labels": int(f * 2000), "f1": v, "pr_auc": v}
        for m, rows in f1.items()
        for f, seeds in zip(fractions, rows)
        for s, v in enumerate(seeds)
    ]


def _rounds(unc: list[list[float]], rand: list[list[float]], per_round: int) -> list[dict]:
    recs = []
    for seed, (u, r) in enumerate(zip(unc, rand)):
        recs.append({"seed": seed, "strategy": "both", "round": 0, "n_inspected": 0, "status": "done", "f1": r[0]})
        for name, v in (("uncertainty", u), ("random", r)):
            recs += [
                {"seed": seed, "strategy": name, "round": k, "n_inspected": k * per_round, "status": "done", "f1": v[k]}
                for k in range(1, len(v))
            ]
    return recs


@pytest.fixture()
def experiment(tmp_path: Path) -> dict:
    out = tmp_path / "exp"
    for rel in FIGURES.values():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"\x89PNG " + rel.encode())
    lc = {
        "source_run": str(out / "runs" / "pretrain"),
        "store": str(out / "stores" / "sdss"),
        "seeds": [0, 1, 2],
        "cells": _cells(
            {"finetune": [[0.5, 0.52, 0.51], [0.7, 0.72, 0.71]], "scratch": [[0.1, 0.3, 0.2], [0.71, 0.69, 0.7]]}, (0.01, 1.0)
        ),
    }
    # uncertainty reaches random's final F1 (0.6, 0.5, 0.7) at rounds 1, 2, 2 of 4: ratios 0.25, 0.5, 0.5
    unc = [[0.3, 0.6, 0.6, 0.7, 0.7], [0.3, 0.4, 0.5, 0.6, 0.6], [0.4, 0.5, 0.8, 0.8, 0.8]]
    rand = [[0.3, 0.4, 0.5, 0.5, 0.6], [0.3, 0.3, 0.4, 0.45, 0.5], [0.4, 0.4, 0.5, 0.6, 0.7]]
    al = {
        "settings": {"per_round": 40, "truth": str(out / "surveys" / "sdss" / "truth.parquet")},
        "rounds": _rounds(unc, rand, 40),
    }
    doc = {"size": {"seeds": 3}, "seed": 0, "timings": {}, "complete": True, "versions": {}, "learning_curve_intervals": []}
    doc["answers"] = answers(lc, al)
    return {"out": out, "lc": lc, "al": al, "doc": doc}


def test_answers_quote_the_ratio_and_the_first_separated_fraction(experiment: dict) -> None:
    from scipy import stats

    a = experiment["doc"]["answers"]
    ratios = np.array([0.25, 0.5, 0.5])
    lo, hi = stats.t.interval(0.95, 2, loc=ratios.mean(), scale=stats.sem(ratios))
    r = a["inspections_to_match"]["ratio"]
    assert (r["mean"], r["lo"], r["hi"]) == pytest.approx((ratios.mean(), max(lo, 0), hi))
    assert f"with {100 * ratios.mean():.0f}% of its inspections" in a["text"][0] and "not met" not in a["text"][0]
    first = a["transfer_gain"]["f1"]["first_separated"]
    assert first["fraction"] == 0.01 and first["winner"] == "finetune"
    assert first["gain"]["mean"] == pytest.approx(np.mean([0.4, 0.22, 0.31]))
    assert "smallest label fraction where the 95% intervals separate is 0.01" in a["text"][1]
    assert not a["transfer_gain"]["f1"]["per_fraction"][1]["separated"]


def test_write_docs_writes_four_portable_files_and_nothing_else(experiment: dict, tmp_path: Path) -> None:
    out, docs = experiment["out"], tmp_path / "docs"
    docs.mkdir()
    (docs / "keep.md").write_text("mine")
    written = write_docs(out, docs, experiment["doc"], experiment["lc"], experiment["al"])
    assert sorted(p.name for p in written) == sorted(
        [f"{n}.{e}" for n in ("learning_curve", "active_learning") for e in ("png", "json")]
    )
    assert (docs / "keep.md").read_text() == "mine" and sorted(p.name for p in docs.iterdir()) == sorted(
        [p.name for p in written] + ["keep.md"]
    )
    for name in DATA:
        body = json.loads((docs / f"{name}.json").read_text())
        assert str(tmp_path) not in json.dumps(body) and body["answer_text"] == experiment["doc"]["answers"]["text"]
        assert (docs / f"{name}.png").read_bytes() == (out / FIGURES[name]).read_bytes()
    lc = json.loads((docs / "learning_curve.json").read_text())
    assert lc["source_run"] == "runs/pretrain" and lc["cells"] == experiment["lc"]["cells"]
    assert json.loads((docs / "active_learning.json").read_text())["settings"]["truth"] == "surveys/sdss/truth.parquet"


def test_write_docs_writes_only_the_parts_asked_for(experiment: dict, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    written = write_docs(experiment["out"], docs, experiment["doc"], experiment["lc"], experiment["al"], ("learning_curve",))
    assert (
        sorted(p.name for p in docs.iterdir()) == sorted(p.name for p in written) == ["learning_curve.json", "learning_curve.png"]
    )


def test_portable_leaves_paths_outside_the_root_alone(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    obj = {"a": [str(root / "x" / "y"), str(tmp_path / "expert"), str(root)], "b": 3, "c": "text"}
    assert portable(obj, root) == {"a": ["x/y", str(tmp_path / "expert"), "."], "b": 3, "c": "text"}


def test_the_converged_size_trains_as_deep_as_the_demo_on_the_device_asked() -> None:
    import math

    from spectransfer.demo import FULL
    from spectransfer.evaluation.experiment import SIZES, _train_options

    deep = SIZES["converged"]
    demo_steps = FULL.finetune_epochs * math.ceil(0.8 * FULL.n_sdss / 64)  # ~588: the demo's fine-tuning
    assert deep.max_steps >= 0.95 * demo_steps and deep.n_sdss == FULL.n_sdss and deep.seeds >= 3
    opts = _train_options(deep, "cuda")
    assert opts["device"] == "cuda" and opts["precision"] == "auto" and opts["max_steps"] == deep.max_steps
    assert _train_options(SIZES["default"])["precision"] == "fp32" and _train_options(SIZES["default"])["device"] == "cpu"
