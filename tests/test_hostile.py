"""Hostile and careless use of the real commands: damaged names, output paths of every kind,
read-only and full disks, two writers at once, stale locks, bad option values.

Every case must end in one line on stderr and a non-zero exit (or a recorded rejection),
never a traceback, never a replaced device or symlink, never a wedged store.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from spectransfer.cli import app
from spectransfer.errors import OutputError
from spectransfer.locks import LockOwner, OutputLock
from spectransfer.provenance import atomic_path, write_text_atomic
from spectransfer.surveys import walk_spectrum_files

GOOD = "sdss/spec-0752-52251-0323.fits"  # a real spec-lite file (ZWARNING 0, full coverage)
BAD_NAME = b"bad_\xff\xfe.fits"  # not valid UTF-8


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed command as a user runs it (main() turns errors into one line)."""
    return subprocess.run([sys.executable, "-m", "spectransfer", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess | object, *needles: str) -> str:
    stderr = proc.stderr  # type: ignore[attr-defined]
    code = getattr(proc, "returncode", getattr(proc, "exit_code", None))
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


# ---- file systems the tests can make: read-only and full (root only) ---------------------------


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A read-only tmpfs: chmod does not stop root, a read-only mount does."""
    where = tmp_path / "ro"
    if not _mount_tmpfs(where, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root and mount rights)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def full_dir(tmp_path: Path):
    """A tmpfs of 64 KiB filled to the last byte."""
    where = tmp_path / "full"
    if not _mount_tmpfs(where, "size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        with open(where / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


# ---- damaged names: a store is never wedged ---------------------------------------------------


def _folder_with_bad_name(shared_data: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = (shared_data / GOOD).read_bytes()
    (folder / "good.fits").write_bytes(data)
    with open(os.path.join(os.fsencode(folder), BAD_NAME), "wb") as fh:
        fh.write(data)
    return folder


def test_non_utf8_name_is_rejected_with_a_reason_and_never_wedges(shared_data: Path, tmp_path: Path) -> None:
    src = _folder_with_bad_name(shared_data, tmp_path / "in")
    store = tmp_path / "S"
    proc = _cli("ingest", str(src), "--store", str(store), "--workers", "0", "--quiet")  # as a user runs it
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    result = _invoke("ingest", str(src), "--store", str(store), "--workers", "0", "--quiet")  # the rerun works too
    assert result.exit_code == 0, result.stderr
    rej = pd.read_parquet(store / "rejected.parquet")
    bad = rej[rej["source_file"].str.contains("bad_")]
    assert len(bad) == 1
    assert bad["source_file"].iloc[0].endswith("bad_\\xff\\xfe.fits")  # printable, lossless for the bytes
    assert "not valid UTF-8" in bad["reason"].iloc[0]
    assert len(pd.read_parquet(store / "meta.parquet")) == 1
    assert not (store / "pending.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "copy.fits").write_bytes((shared_data / "sdss/spec-1325-52762-0133.fits").read_bytes())
    result = _invoke("ingest", str(other), "--store", str(store), "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len(pd.read_parquet(store / "meta.parquet")) == 2


def test_a_plan_that_holds_a_non_utf8_name_is_finished_not_repeated(shared_data: Path, tmp_path: Path) -> None:
    """A pending.json written before such names were caught (the wedge) is unwedged by the next ingest."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.fits").write_bytes((shared_data / GOOD).read_bytes())
    store = tmp_path / "S"
    assert _invoke("ingest", str(src), "--store", str(store), "--workers", "0", "--quiet").exit_code == 0
    info = json.loads((store / "store.json").read_text())
    bad = os.fsdecode(os.path.join(os.fsencode(src), BAD_NAME))
    (store / "pending.json").write_text(
        json.dumps(
            {
                "run_seq": info.get("last_run_seq", 1),
                "batches": [{"batch_id": "000001-9999999", "row_start": 0, "capacity": 0, "files": [[bad, "1:1", None]]}],
            }
        )
        + "\n"
    )
    result = _invoke("ingest", str(src), "--store", str(store), "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert not (store / "pending.json").exists()
    rej = pd.read_parquet(store / "rejected.parquet")
    assert rej["reason"].str.contains("not valid UTF-8").sum() == 1


@pytest.mark.slow
def test_non_utf8_name_with_dask_workers(shared_data: Path, tmp_path: Path) -> None:
    src = _folder_with_bad_name(shared_data, tmp_path / "in")
    proc = _cli("ingest", str(src), "--store", str(tmp_path / "S"), "--workers", "2", "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_walker_records_what_it_skips(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.fits").write_bytes(b"x")
    (root / "sub" / "loop").symlink_to(root)  # a folder loop
    (root / "broken.fits").symlink_to(tmp_path / "nowhere.fits")
    (root / "self.fits").symlink_to(root / "self.fits")
    os.mkfifo(root / "pipe.fits")
    with open(os.path.join(os.fsencode(root), BAD_NAME), "wb") as fh:
        fh.write(b"x")
    walk = walk_spectrum_files([root, tmp_path / "missing.fits"])
    assert walk.files == [root / "a.fits"]
    reasons = {Path(p).name: r for p, r in walk.skipped}
    assert reasons["broken.fits"] == "broken symbolic link"
    assert reasons["self.fits"] == "symbolic link loop"
    assert reasons["pipe.fits"] == "not a regular file"
    assert reasons["bad_\\xff\\xfe.fits"].startswith("file name is not valid UTF-8")
    assert reasons["loop"].startswith("symbolic link loop")
    assert "no such file" in reasons["missing.fits"]


def test_info_names_an_unreadable_path_and_goes_on(shared_data: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.fits")
    result = _invoke("info", "--json", str(tmp_path / "pipe.fits"), str(shared_data / GOOD))
    assert result.exit_code == 1
    assert json.loads(result.stdout)["path"] == str(shared_data / GOOD)
    assert "pipe.fits: not a regular file" in result.stderr


def test_second_ingest_without_catalog_keeps_the_remembered_catalogue(tmp_path: Path) -> None:
    from spectransfer.simulate import simulate_survey

    sim = tmp_path / "sim"
    res = simulate_survey("sdss", 6, sim, seed=3, qso_fraction=0.5, workers=1)
    store = tmp_path / "S"
    assert (
        _invoke("ingest", str(sim), "--store", str(store), "--catalog", str(res.catalog), "--workers", "0", "-q").exit_code == 0
    )
    result = _invoke("ingest", str(sim), "--store", str(store), "--workers", "0", "-q")
    assert result.exit_code == 0, result.stderr
    rej = pd.read_parquet(store / "rejected.parquet")
    assert not rej["source_file"].astype(str).str.endswith(res.catalog.name).any()


# ---- output paths: the atomic writer refuses what is not a regular file ---------------------------


def test_writer_follows_a_symlink_to_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real" / "out.txt"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_writer_refuses_a_fifo_and_a_folder(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(OutputError, match="not a regular file"):
            write_text_atomic(target, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_writer_refuses_a_character_device_before_writing() -> None:
    wrote = []
    with pytest.raises(OutputError, match="character device"):
        with atomic_path("/dev/null") as tmp:  # pragma: no cover - the body must never run
            wrote.append(tmp)
    assert wrote == []
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def _verdict_db(path: Path) -> Path:
    from spectransfer.inspect.verdicts import VerdictDB

    VerdictDB(path).record("sdss-0752-52251-0323", "qso", "tester", 1.5)
    return path


def test_verdicts_export_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    from astropy.table import Table

    db = _verdict_db(tmp_path / "v.sqlite")
    target = tmp_path / "target.fits"
    target.write_bytes(b"old")
    link = tmp_path / "link.fits"
    link.symlink_to(target)
    result = _invoke("verdicts", "export", "--db", str(db), "--out", str(link))
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink()
    assert list(Table.read(target, hdu="VERDICTS")["SPECTRUM_ID"]) == ["sdss-0752-52251-0323"]


def test_verdicts_export_refuses_a_fifo_and_dev_null(tmp_path: Path) -> None:
    db = _verdict_db(tmp_path / "v.sqlite")
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    _one_line_error(_invoke("verdicts", "export", "--db", str(db), "--out", str(fifo)), "pipe.fits", "FIFO")
    _one_line_error(_invoke("verdicts", "export", "--db", str(db), "--out", "/dev/null"), "/dev/null", "character device")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--store", "S", "--out"],
        ["evaluate", "RUN", "--store", "S", "--out"],
        ["discover", "RUN", "--store", "S", "--out"],
        ["demo", "--out"],
        ["ingest", "IN", "--store"],
        ["simulate", "--survey", "sdss", "--n", "2", "--out"],
        ["fetch", "catalog", "dr16q", "--dest"],
    ],
)
@pytest.mark.parametrize("where", ["proc", "below_a_file", "existing_file"])
def test_unwritable_outputs_are_one_line(command: list[str], where: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = {"proc": "/proc/spectransfer-out", "below_a_file": str(a_file / "out"), "existing_file": str(a_file)}[where]
    if command[0] == "discover" and where == "existing_file":
        out = str(tmp_path)  # discover writes a file: a folder is what it must refuse
    _one_line_error(_invoke(*command, out), out)
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_read_only_folder_is_one_line_before_any_work(readonly_dir: Path, tmp_path: Path) -> None:
    db = _verdict_db(tmp_path / "v.sqlite")
    cases = [
        ["train", "--store", str(tmp_path), "--out", str(readonly_dir / "run")],
        ["ingest", str(tmp_path), "--store", str(readonly_dir / "S")],
        ["verdicts", "export", "--db", str(db), "--out", str(readonly_dir / "v.fits")],
        ["fetch", "catalog", "dr16q", "--dest", str(readonly_dir / "d")],
        ["evaluate", "RUN", "--store", "S", "--out", str(readonly_dir / "report")],
    ]
    for args in cases:
        line = _one_line_error(_cli(*args), str(readonly_dir))
        assert "Read-only file system" in line


def test_disk_full_is_one_line(full_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="No space left on device"):
        write_text_atomic(full_dir / "big.txt", "x" * 100_000)
    safetensors = pytest.importorskip("safetensors.numpy")
    import numpy as np

    with pytest.raises(OutputError, match="No space left on device"):  # the model writer's own error type
        with atomic_path(full_dir / "model.safetensors") as tmp:
            safetensors.save_file({"w": np.zeros(100_000, dtype="f4")}, str(tmp))
    assert sorted(p.name for p in full_dir.iterdir()) == ["filler"]  # no temporary file left


def test_ingest_into_a_full_disk_is_one_line(full_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.fits").write_bytes((shared_data / GOOD).read_bytes())
    _one_line_error(
        _cli("ingest", str(src), "--store", str(full_dir / "S"), "--workers", "0", "--quiet"), "No space left on device"
    )


# ---- two writers, stale locks ------------------------------------------------------------------------


def test_second_train_into_the_same_out_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from spectransfer.locks import OutputLock
        with OutputLock({str(run / "run.lock")!r}, "a train run"):
            print("held", flush=True)
            time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _one_line_error(
            _cli("train", "--store", str(tmp_path / "S"), "--out", str(run)),
            str(run),
            "in use by a train run",
            f"pid {holder.pid}",
        )
        assert "wait for it" in line
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, lock file left behind): the next run takes the lock over.
    assert (run / "run.lock").exists()
    with OutputLock(run / "run.lock", "a train run"):
        assert LockOwner.parse((run / "run.lock").read_text()).pid == os.getpid()


def test_lock_of_a_reused_pid_or_an_earlier_boot_is_stale(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    me = LockOwner.me("a train run")
    # pid 1 is alive, but it is not the process that wrote the lock (its start time differs).
    lock.write_text(json.dumps({**me.__dict__, "pid": 1, "start": "1"}))
    with OutputLock(lock, "a test"):
        pass
    lock.write_text(json.dumps({**me.__dict__, "boot_id": "not-this-boot"}))  # our own pid, before a reboot
    with OutputLock(lock, "a test"):
        pass
    lock.write_text(json.dumps({**me.__dict__, "host": "elsewhere.example"}))
    with pytest.raises(OutputError, match="remove .*x.lock if that process is gone"):
        with OutputLock(lock, "a test"):
            pass
    lock.write_text(json.dumps(me.__dict__))  # genuinely ours and alive
    with pytest.raises(OutputError, match="in use by a train run"):
        with OutputLock(lock, "a test"):
            pass


def test_ingest_reads_the_old_lock_format(tmp_path: Path) -> None:
    lock = tmp_path / "ingest.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    assert LockOwner.parse(lock.read_text()).alive() is True
    lock.write_text(f"{socket.gethostname()} 999999999")
    with OutputLock(lock, "an ingest"):
        pass


# ---- options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
        (["--workers", "-1"], "--workers must be an integer >= 0"),
        (["--train-fraction", "1.5"], "--train-fraction must be a number in (0, 1]"),
    ],
)
def test_train_options_are_checked_before_anything_runs(args: list[str], needle: str, tmp_path: Path) -> None:
    _one_line_error(_invoke("train", "--store", str(tmp_path), "--out", str(tmp_path / "run"), *args), needle)
    assert not (tmp_path / "run").exists()


def test_cuda_without_cuda_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(
        _invoke("train", "--store", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda"), "no CUDA device"
    )


def test_stats_on_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "meta.parquet"
    f.write_text("x")
    _one_line_error(_cli("stats", str(f)), "is a file, not a store")


def test_simulate_overwrite_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    _one_line_error(
        _cli("simulate", "--survey", "sdss", "--n", "2", "--out", str(precious), "--overwrite", "-q"), "not written by"
    )
    assert (precious / "thesis.tex").read_text() == "years of work"
    sim = tmp_path / "sim"
    assert _invoke("simulate", "--survey", "sdss", "--n", "2", "--out", str(sim), "-q").exit_code == 0
    result = _invoke("simulate", "--survey", "sdss", "--n", "3", "--out", str(sim), "--overwrite", "-q")
    assert result.exit_code == 0, result.stderr
    assert len(list(sim.rglob("spec-*.fits"))) == 3


def test_torch_checkpoint_on_a_full_disk_is_one_line(full_dir: Path) -> None:
    """torch.save reports a full disk as a bare RuntimeError; the writer still names the cause."""
    import torch

    with pytest.raises(OutputError, match="No space left on device"):
        with atomic_path(full_dir / "last.pt") as tmp:
            torch.save({"w": torch.zeros(100_000)}, tmp)
    assert sorted(p.name for p in full_dir.iterdir()) == ["filler"]


def test_a_refused_train_leaves_no_folder(tmp_path: Path) -> None:
    result = _invoke("train", "--store", str(tmp_path / "no-store"), "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert not (tmp_path / "run").exists()
