"""Training: the run folder, transfer modes, resume after SIGKILL, DDP on CPU, refusals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spectransfer.config import Grid
from spectransfer.errors import TrainError
from spectransfer.ml.models import load_run, read_weights, shift_z_bins
from spectransfer.ml.train import TrainConfig, train
from test_dataset import make_store

ROOT = Path(__file__).resolve().parents[1]
SPECTRANSFER = [sys.executable, "-m", "spectransfer"]
# A short grid keeps VGG-A's arithmetic small enough for the tests (the net is the same).
SMALL = Grid(n_bins=256, wave_min=3839.0, wave_max=8915.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("train") / "store",
        n=240,
        chunk_rows=16,
        grid=SMALL,
        surveys=("sdss", "lamost"),
        splits=(0.6, 0.25),
        with_z=True,
    )


@pytest.fixture(scope="module")
def scratch_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "scratch"
    summary = train(
        TrainConfig(
            store=str(store.path),
            out=str(out),
            batch_size=16,
            eval_every=5,
            max_steps=30,
            num_workers=0,
            seed=1,
            imbalance="pos-weight",
        )
    )
    return out, summary


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_scratch_run_folder_holds_everything(scratch_run, store):
    out, summary = scratch_run
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["train"]["batch_size"] == 16 and config["train"]["mode"] == "scratch"
    assert config["store"]["store_id"] == store.info["store_id"]
    assert config["spectransfer_version"]
    n_train = int((store.meta["split"] == "train").sum())
    n_pos = int(((store.meta["split"] == "train") & (store.meta["label"] == 1)).sum())
    assert config["resolved"]["n_train"] == n_train
    assert config["resolved"]["pos_weight"] == pytest.approx((n_train - n_pos) / n_pos)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20, 25, 30]
    assert {"train_loss", "val_loss", "val_f1", "val_precision", "val_recall"} <= set(lines[0])
    assert summary["best"] == max(m["val_f1"] for m in lines)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.pt").is_file()
    # the best weights rebuild from the file alone, with the grid and mode in its metadata
    model, info = load_run(out)
    assert info.model_name == "vgg-a" and info.grid == SMALL and info.mode == "scratch"
    assert info.config["train"]["seed"] == 1 and info.temperature is None
    _, meta = read_weights(out / "model.safetensors")
    assert meta["step"] == str(summary["best_step"])
    # the separable toy survey is learnt: the best validation F1 is high
    assert summary["best"] > 0.8


def test_finetune_loads_every_weight_and_freeze_conv_trains_only_the_head(scratch_run, store, tmp_path):
    init, _ = scratch_run
    base = _weights(init / "model.safetensors")
    # lr 0: a fine-tuned run that cannot move must end exactly at the pretrained weights
    train(
        TrainConfig(
            store=str(store.path),
            out=str(tmp_path / "ft0"),
            mode="finetune",
            init=str(init),
            batch_size=16,
            eval_every=3,
            max_steps=3,
            lr=0.0,
            num_workers=0,
            survey="sdss",
        )
    )
    resolved = tomllib.loads((tmp_path / "ft0" / "config.toml").read_text())["resolved"]
    m = store.meta
    assert resolved["n_train"] == int(((m["survey"] == "sdss") & (m["split"] == "train")).sum())
    assert resolved["n_val"] == int(((m["survey"] == "sdss") & (m["split"] == "val")).sum())
    for k, v in _weights(tmp_path / "ft0" / "model.safetensors").items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    _, info = load_run(tmp_path / "ft0")
    assert info.mode == "finetune"
    train(
        TrainConfig(
            store=str(store.path),
            out=str(tmp_path / "fc"),
            mode="freeze-conv",
            init=str(init),
            batch_size=16,
            eval_every=4,
            max_steps=4,
            num_workers=0,
            early_stop="loss",
        )
    )
    ckpt = torch.load(tmp_path / "fc" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k, v in ckpt.items():
        if k.startswith("features."):
            torch.testing.assert_close(v, base[k], rtol=0, atol=0)
        elif k.endswith("weight"):
            assert not torch.equal(v, base[k]), k
    config = tomllib.loads((tmp_path / "fc" / "config.toml").read_text())
    assert config["resolved"]["n_trainable"] < config["resolved"]["n_parameters"]


def test_z_head_learns_the_catalogue_redshift(scratch_run):
    out, _ = scratch_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    z_loss = [m["val_z_loss"] for m in lines]
    bins = shift_z_bins(SMALL.log_step)  # the default head: two bins per 32 grid bins over z 0-7
    # validation cross-entropy of the z head falls from near ln(bins) (know nothing) as it trains
    assert z_loss[0] < math.log(bins) + 0.5
    assert z_loss[-1] < z_loss[0] - 0.1  # in 25 steps at the default weight 0.1
    assert all(m["val_z_n"] > 0 and 0 <= m["val_z_catastrophic"] <= 1 for m in lines)
    model, info = load_run(out)
    assert info.model_config.z_bins == bins and info.model_config.z_head_kind == "shift" and model.z_head is not None


def test_finetune_from_a_run_without_z_head_starts_a_fresh_z_head(store, tmp_path):
    init = tmp_path / "noz"
    train(
        TrainConfig(store=str(store.path), out=str(init), batch_size=16, eval_every=3, max_steps=3, num_workers=0, z_head=False)
    )
    base, meta = read_weights(init / "model.safetensors")
    assert not any(k.startswith("z_head.") for k in base)
    assert json.loads(meta["model_config"])["z_bins"] == 0
    # lr 0: the transferred tensors stay exactly the init run's; the z head exists, fresh
    train(
        TrainConfig(
            store=str(store.path),
            out=str(tmp_path / "ft"),
            mode="finetune",
            init=str(init),
            batch_size=16,
            eval_every=3,
            max_steps=3,
            lr=0.0,
            num_workers=0,
        )
    )
    tuned = _weights(tmp_path / "ft" / "model.safetensors")
    for k, v in base.items():
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=0)
    assert {k for k in tuned if k.startswith("z_head.")} == {
        "z_head.pattern",
        "z_head.prior",
        "z_head.mix.weight",
        "z_head.mix.bias",
    }
    lines = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["val_z_loss"] is not None


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(SPECTRANSFER + args, capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(store, tmp_path):
    args = [
        "train",
        "--store",
        str(store.path),
        "--batch-size",
        "8",
        "--eval-every",
        "3",
        "--max-steps",
        "12",
        "--seed",
        "3",
        "--workers",
        "2",
        "--ema",
        "0.9",
        "--quiet",
    ]
    whole = _run_cli(args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    # the same run, killed with SIGKILL once a checkpoint exists, then resumed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        SPECTRANSFER + args + ["--out", str(tmp_path / "cut")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = tmp_path / "cut" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert killed_at < 12
    resumed = _run_cli(["train", "--store", str(store.path), "--out", str(tmp_path / "cut"), "--resume", "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["state"] == b["state"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k  # the weights' average resumes too
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12
    wa, wb = _weights(tmp_path / "whole" / "model.safetensors"), _weights(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(3, 13, 3))  # no duplicated lines from before the kill


def test_two_process_ddp_on_cpu_sees_disjoint_data_and_ends_identical(store, tmp_path):
    out = tmp_path / "ddp"
    summary = train(
        TrainConfig(
            store=str(store.path),
            out=str(out),
            batch_size=8,
            eval_every=4,
            max_steps=8,
            devices=2,
            device="cpu",  # gloo CPU processes, also on a machine with one GPU
            num_workers=0,
            debug_rows=True,
            seed=2,
        )
    )
    assert summary["steps"] == 8
    seen = []
    for rank in range(2):
        rows = [line.split()[2:] for line in (out / "debug" / f"rows-rank{rank}.txt").read_text().splitlines()]
        assert len(rows) == 8  # same number of steps on both ranks
        seen.append({int(r) for batch in rows for r in batch})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    train_rows = set(store.meta.loc[store.meta["split"] == "train", "row"].tolist())
    assert seen[0] | seen[1] <= train_rows
    w0 = _weights(out / "debug" / "final-rank0.safetensors")
    w1 = _weights(out / "debug" / "final-rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert tomllib.loads((out / "config.toml").read_text())["resolved"]["world_size"] == 2


def test_bad_inputs_refused_before_training(store, scratch_run, tmp_path):
    init, _ = scratch_run
    base = dict(store=str(store.path), batch_size=8, max_steps=2, num_workers=0)
    with pytest.raises(TrainError, match="no spectra of survey 'boss'"):
        train(TrainConfig(out=str(tmp_path / "a"), survey="boss", **base))
    with pytest.raises(TrainError, match="incompatible --init"):
        train(TrainConfig(out=str(tmp_path / "b"), mode="finetune", init=str(init), model="vgg-b", **base))
    with pytest.raises(TrainError, match="needs --init"):
        train(TrainConfig(out=str(tmp_path / "c"), mode="finetune", **base))
    with pytest.raises(TrainError, match="not a run folder"):
        train(TrainConfig(out=str(tmp_path / "d"), mode="finetune", init=str(tmp_path / "nope"), **base))
    with pytest.raises(TrainError, match="already holds a run"):
        train(TrainConfig(out=str(init), **base))
    # a store on another grid, one without validation rows, one without quasars
    other = make_store(tmp_path / "other", n=60, grid=Grid(n_bins=256, wave_min=3600.0, wave_max=9000.0))
    with pytest.raises(TrainError, match="incompatible --init: trained on grid"):
        train(TrainConfig(**{**base, "store": str(other.path)}, out=str(tmp_path / "e"), mode="finetune", init=str(init)))
    noval = make_store(tmp_path / "noval", n=60, grid=SMALL, splits=(1.0, 0.0))
    with pytest.raises(TrainError, match="no validation rows"):
        train(TrainConfig(**{**base, "store": str(noval.path)}, out=str(tmp_path / "f")))
    nopos = make_store(tmp_path / "nopos", n=60, grid=SMALL, pos_frac=0.0)
    with pytest.raises(TrainError, match="no positive"):
        train(TrainConfig(**{**base, "store": str(nopos.path)}, out=str(tmp_path / "g")))
    # more processes than the store has windows for (240 rows in chunks of 16: 9 train windows
    # of 4 chunks at most), and more GPU processes than GPUs
    with pytest.raises(TrainError, match="too few for 16 processes"):
        train(TrainConfig(out=str(tmp_path / "i"), devices=16, device="cpu", **base))
    with pytest.raises(TrainError, match=f"this machine has {torch.cuda.device_count()} GPU"):
        train(TrainConfig(out=str(tmp_path / "j"), devices=torch.cuda.device_count() + 1, device="cuda", **base))
    for name in "abcdefgij":
        assert not (tmp_path / name / "checkpoints").exists()
    # the command line turns them into one line and exit code 2
    res = _run_cli(["train", "--store", str(nopos.path), "--out", str(tmp_path / "h"), "--quiet"])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no positive" in res.stderr


def test_help_documents_the_imbalance_options():
    res = _run_cli(["train", "--help"], timeout=60)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for word in (
        "pos-weight",
        "balanced",
        "n_neg/n_pos",
        "--train-fraction",
        "--resume",
        "--precision",
        "--z-head",
        "--no-z-head",
        "--z-weight",
    ):
        assert word in text, word


def test_epochs_whose_batch_count_differs_with_loader_workers_run_to_the_end(store, tmp_path):
    """Two loader workers each end an epoch on their own partial batch and the windows fall
    to them differently every epoch, so the number of batches moves between epochs; training
    must follow each epoch's own count (it used to stop with 'the training stream ended')."""
    from spectransfer.ml.dataset import ChunkStream, select
    from spectransfer.ml.train import steps_per_epoch

    cfg = TrainConfig(
        store=str(store.path), out=str(tmp_path / "w"), batch_size=4, buffer_chunks=1, num_workers=2, max_epochs=2, seed=1
    )
    stream = ChunkStream(store.flux, select(store, None, "train"), batch_size=4, shuffle=True, seed=1, buffer_chunks=1)
    stream.loader(2)
    counts = steps_per_epoch(stream, 2)
    assert len(set(counts)) > 1  # the case that matters: the epochs differ
    actual = []
    for epoch in range(2):  # what the DataLoader really yields
        stream.set_epoch(epoch)
        stream.set_start(0)
        actual.append(sum(1 for _ in stream.loader(2)))
    assert actual == counts
    summary = train(cfg)
    assert summary["epochs_completed"] == 2 and summary["steps"] == sum(counts)


def test_a_run_saved_before_the_z_head_options_resumes_without_them(tmp_path):
    from spectransfer.ml.train import _resume_config

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "config.toml").write_text(f'[train]\nstore = "s"\nout = "{tmp_path}"\nseed = 4\n')
    cfg = _resume_config(TrainConfig(store="other", out=str(tmp_path)))
    assert (cfg.store, cfg.seed, cfg.z_head, cfg.z_shift, cfg.z_head_kind) == ("s", 4, False, 0, "dense")
    (tmp_path / "config.toml").write_text(f'[train]\nstore = "s"\nout = "{tmp_path}"\nz_head = true\n')
    cfg = _resume_config(TrainConfig(store="other", out=str(tmp_path)))
    assert (cfg.z_head, cfg.z_shift, cfg.z_head_kind) == (True, 0, "dense")  # the dense head, no shifts


def test_depth_augmented_training_sees_noisier_rows_and_records_the_setting(tmp_path):
    from spectransfer.ml.train import World, _build_session, plan

    st = make_store(tmp_path / "s", n=120, chunk_rows=16, grid=SMALL, splits=(0.6, 0.25), with_z=True, with_snr=True)
    base = dict(store=str(st.path), batch_size=16, eval_every=4, max_steps=4, num_workers=0, seed=3)
    summary = train(TrainConfig(out=str(tmp_path / "run"), depth_augment=0.5, **base))
    assert summary["steps"] == 4
    assert "depth_augment = 0.5" in (tmp_path / "run" / "config.toml").read_text()
    with pytest.raises(TrainError, match="--depth-augment"):
        train(TrainConfig(out=str(tmp_path / "bad"), depth_augment=1.5, **base))
    # the training stream shows some rows noisier than the store holds them; validation does not
    cfg = TrainConfig(out=str(tmp_path / "x"), depth_augment=0.5, **base)
    s = _build_session(cfg, plan(cfg), World(1, 0, 0, torch.device("cpu"), False))
    assert s.train_stream.depth == 0.5
    x, _, rows = next(iter(s.train_stream.loader(0)))
    held = np.asarray(st.flux.get_orthogonal_selection((np.sort(rows.numpy()), slice(None))))
    order = np.argsort(rows.numpy())
    changed = np.any(x.numpy()[order, 0] != held, axis=1)
    assert 0 < changed.sum() < changed.size
    # a store without each spectrum's S/N cannot be trained shallower: told, not silently ignored
    bare = make_store(tmp_path / "bare", n=120, chunk_rows=16, grid=SMALL, splits=(0.6, 0.25), with_z=True)
    with pytest.raises(TrainError, match="meta column snr"):
        plan(TrainConfig(out=str(tmp_path / "y"), depth_augment=0.5, **{**base, "store": str(bare.path)}))
    assert not np.isfinite(plan(TrainConfig(out=str(tmp_path / "y"), **{**base, "store": str(bare.path)})).train.snr).any()


def test_weight_average_follows_its_rule_and_is_what_the_run_saves(store, tmp_path):
    from spectransfer.ml.train import WeightAverage

    # the update rule against a direct computation: decay warmed up as min(d, (1+t)/(10+t))
    lin = torch.nn.Linear(3, 1)
    avg = WeightAverage(lin, 0.99)
    start = lin.weight.detach().clone().numpy()
    expected = start.copy()
    for t in range(1, 6):
        with torch.no_grad():
            lin.weight.add_(1.0)
        d = min(0.99, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * lin.weight.detach().numpy()
        avg.update(lin)
    np.testing.assert_allclose(avg.model.weight.numpy(), expected, rtol=1e-6)
    assert not np.allclose(expected, lin.weight.detach().numpy())  # it lags the stepped weights
    # a run with --ema saves (and validates) the average, not the weights it stepped
    base = dict(store=str(store.path), batch_size=8, eval_every=8, max_steps=8, num_workers=0, seed=2)
    train(TrainConfig(out=str(tmp_path / "ema"), ema=0.9, **base))  # one evaluation: the saved weights are the last
    ckpt = torch.load(tmp_path / "ema" / "checkpoints" / "last.pt", weights_only=False)
    saved = _weights(tmp_path / "ema" / "model.safetensors")
    assert json.loads((tmp_path / "ema" / "summary.json").read_text())["best_step"] == 8
    k = next(k for k in saved if k.endswith("weight"))
    assert not torch.equal(ckpt["ema"]["model"][k], ckpt["model"][k])
    assert all(torch.equal(saved[n], ckpt["ema"]["model"][n]) for n in saved)
    with pytest.raises(TrainError, match="--ema"):
        train(TrainConfig(out=str(tmp_path / "bad"), ema=1.0, **base))
