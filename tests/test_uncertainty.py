"""MC-dropout spread of P(QSO): computed by the one scorer, written as P_QSO_STD, and ordering the
inspection queue so the most uncertain spectrum comes first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from spectransfer.candidates.discover import discover
from spectransfer.errors import EvaluateError
from spectransfer.inspect import InspectError
from spectransfer.inspect.app import create_app
from test_discover import _run, _store


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("mc")
    _store(base / "store", n=60, seed=1)
    run = _run(base / "run", seed=3)
    out = base / "c.parquet"
    discover(run, base / "store", out, engine="torch", quiet=True, refine="none", mc_samples=8)
    return {"base": base, "run": run, "table": pd.read_parquet(out)}


def test_mc_dropout_spread_is_written_and_reproducible(scored: dict) -> None:
    t = scored["table"]
    std = t["P_QSO_STD"].to_numpy()
    assert np.isfinite(std).all() and (std > 0).all() and (std < 0.5).all()
    again = scored["base"] / "again.parquet"
    discover(scored["run"], scored["base"] / "store", again, engine="onnx", quiet=True, refine="none", mc_samples=8)
    np.testing.assert_allclose(pd.read_parquet(again)["P_QSO_STD"].to_numpy(), std, rtol=1e-5, atol=1e-7)


def test_spread_matches_a_direct_mc_dropout_computation(scored: dict) -> None:
    import torch

    from spectransfer.data.store import open_store
    from spectransfer.ml.models import load_run
    from spectransfer.ml.score import MC_SEED, mc_dropout_scorer, prepare_engine, read_block

    store = open_store(scored["base"] / "store")
    x = read_block(store, store.rows()[:16])
    spec = prepare_engine(scored["run"], "torch", scored["base"] / "w", mc_samples=8)
    got = mc_dropout_scorer(spec)(x)
    net, _ = load_run(scored["run"])
    torch.manual_seed(MC_SEED)
    with torch.no_grad():
        feats = net.features(torch.from_numpy(x))
        net.head.train()  # the head holds only Linear/ReLU/Dropout: train() switches on its dropout alone
        p = torch.stack([torch.sigmoid(net.head(feats).squeeze(-1)) for _ in range(8)])
    np.testing.assert_allclose(got, p.std(dim=0).numpy(), rtol=1e-5, atol=1e-7)


def test_without_mc_dropout_the_column_is_nan_and_one_pass_is_refused(scored: dict, tmp_path: Path) -> None:
    out = tmp_path / "plain.parquet"
    discover(scored["run"], scored["base"] / "store", out, engine="torch", quiet=True, refine="none")
    assert pd.read_parquet(out)["P_QSO_STD"].isna().all()
    with pytest.raises(EvaluateError, match="--mc-dropout"):
        discover(scored["run"], scored["base"] / "store", tmp_path / "x.parquet", engine="torch", quiet=True, mc_samples=1)


def test_uncertainty_order_puts_the_largest_spread_first(scored: dict, tmp_path: Path) -> None:
    table = scored["table"]
    by_spread = table.sort_values(["P_QSO_STD", "P_QSO"], ascending=[False, False])["SPECTRUM_ID"].tolist()
    by_p = table.sort_values("P_QSO", ascending=False)["SPECTRUM_ID"].tolist()

    def first(order: str | None, n: int = 60) -> tuple[str, list[str]]:
        app = create_app(table, None, tmp_path / "v.sqlite", order=order)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            used = client.get("/api/info").json()["order"]
            items = client.get("/api/candidates", params={"limit": n}).json()["items"]
        return used, [i["id"] for i in items]

    used, ids = first(None)  # the table has spreads: uncertainty is the default
    assert used == "uncertainty" and ids == by_spread
    assert first("p_qso") == ("p_qso", by_p)
    used, shuffled = first("random")
    assert sorted(shuffled) == sorted(by_p) and shuffled not in (by_p, by_spread) and first("random")[1] == shuffled
    with pytest.raises(InspectError, match="--mc-dropout"):
        create_app(table.drop(columns="P_QSO_STD"), None, tmp_path / "w.sqlite", order="uncertainty")
    with pytest.raises(InspectError, match="--order must be one of"):
        create_app(table, None, tmp_path / "w.sqlite", order="best")
