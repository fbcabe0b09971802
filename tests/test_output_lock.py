"""One run per output folder (issue 19): a second train.py on a folder in use stops at once, the first goes on."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, make_image_folder, run
from vitfood.config import TrainConfig
from vitfood.errors import VitfoodError
from vitfood.folder_lock import LOCK_FILE, holds_lock_for_job, output_dir_lock
from vitfood.run import evaluate_only

# train.py's own code path, held at the start of its first epoch (lock taken, caches made, run.json written)
# until the test creates GO: a first run that is surely still running while the second starts.
HELD_RUN = """
import pathlib, sys, time
import vitfood.train_loop as tl
started, go = map(pathlib.Path, sys.argv[1:3])
real = tl.train_epoch
def held(*args, **kwargs):
    started.touch()
    while not go.exists():
        time.sleep(0.02)
    return real(*args, **kwargs)
tl.train_epoch = held
from vitfood.cli import train_main
sys.exit(train_main(sys.argv[3:]))
"""


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first run never started its epoch"
        time.sleep(0.05)


def test_a_second_run_on_a_folder_in_use_stops_at_once_and_the_first_is_untouched(backbone_dir, tmp_path):
    folder = make_image_folder(tmp_path / "ds", per_class=4, size=(16, 16))
    out = tmp_path / "out"
    args = ["--model", backbone_dir, "--dataset", folder, "--output-dir", out, "--epochs", 1, "--batch-size", 4,
            "--num-workers", 0, "--decode-cache", "on"]
    started, go = tmp_path / "started", tmp_path / "go"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN, started, go, *map(str, args)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(started, first)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        assert "decoded-images" in before and "run.json" in before
        # --overwrite-output-dir too: the lock comes before anything in the folder is removed.
        second = run("train.py", *args, "--overwrite-output-dir", timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --output-dir {out} is in use by another "
                                                       f"run (pid {first.pid} on "), second.stderr
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
        # --eval-only into that folder (in this process: another open file, so another lock) is refused too.
        report = TrainConfig(model=str(backbone_dir), dataset=str(folder), output_dir=str(out), eval_only=True)
        with pytest.raises(VitfoodError, match=f"is in use by another run \\(pid {first.pid} "):
            evaluate_only(report)
        go.touch()
        _, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and (out / "model.safetensors").is_file()
    assert not (out / "decoded-images").exists() and not (out / LOCK_FILE).exists()


def test_a_killed_holder_frees_the_folder_and_a_failed_run_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom vitfood.folder_lock import "
                               "output_dir_lock\nwith output_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(60)", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(VitfoodError, match=f"in use by another run \\(pid {holder.pid} on "):
            with output_dir_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup of its own: the kernel frees the lock
        holder.wait()
    assert (out / LOCK_FILE).exists()  # left behind by the killed run, and not in the way:
    with output_dir_lock(out):
        pass
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(RuntimeError):
        with output_dir_lock(tmp_path / "fresh" / "out"):
            raise RuntimeError("the run failed before writing anything")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("env, holds", [({}, True), ({"WORLD_SIZE": "4", "RANK": "0"}, True),
                                        ({"WORLD_SIZE": "4", "RANK": "3"}, False),
                                        ({"WORLD_SIZE": "1", "RANK": "2"}, True)])
def test_under_torchrun_rank_0_holds_the_lock_for_the_job(monkeypatch, env, holds):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert holds_lock_for_job() is holds


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_runs_with_a_warning_and_other_lock_errors_stop(tmp_path, monkeypatch, capsys,
                                                                                    code):
    # NFS mounted nolock, Lustre or GPFS without flock: flock itself fails; the run goes on, saying so.
    import fcntl

    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    with output_dir_lock(out):
        assert out.is_dir() and not (out / LOCK_FILE).exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: --output-dir" in err and "takes no locks" in err
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(VitfoodError, match="cannot lock .* choose a folder on a local disk"):
        with output_dir_lock(tmp_path / "other"):
            pass
