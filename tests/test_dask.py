"""``run --dask``: a real scheduler and real workers, each a separate process on this machine."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from fake_ilastik import FakeIlastik, pid_alive

from steinpix._cli.main import main

from conftest import EXAMPLE, TEST_DATA

distributed = pytest.importorskip(
    "distributed", reason="Dask's distributed is not installed: pip install 'steinpix[dask]'"
)
pytestmark = pytest.mark.skipif(os.name != "posix", reason="starts and kills POSIX processes")

REF_IMG = TEST_DATA / "reference" / "ilastik_img"
TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")
START_TIMEOUT_S = 120


class Cluster:
    """A ``dask scheduler`` and ``dask worker`` processes (one thread each) on 127.0.0.1.

    Every process runs in its own session, so that :meth:`close` ends it with all its
    children (a worker's nanny starts the worker as a child).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = folder / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self._start(
            [
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(self.scheduler_file),
            ],
            "scheduler",
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.scheduler_file.exists():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.close()
                raise RuntimeError(f"the Dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.05)
        # the file appears before it is complete: read it the way steinpix does
        from steinpix.cluster import read_scheduler_file

        for _ in range(100):
            with contextlib.suppress(Exception):
                self.address = read_scheduler_file(self.scheduler_file)
                break
            time.sleep(0.05)

    def _start(self, args: list[str], name: str, prefix: tuple[str, ...] = ()) -> None:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.folder,
        )
        log.close()
        self.procs.append(proc)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]

    def add_worker(self, name: str, prefix: tuple[str, ...] = ()) -> None:
        args = ["-m", "distributed.cli.dask_worker", "--scheduler-file", str(self.scheduler_file)]
        args += ["--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
        args += ["--death-timeout", "60", "--local-directory", str(self.folder / name)]
        self._start(args, name, prefix)

    def client(self):
        return distributed.Client(self.address, timeout=30, set_as_default=False)

    def wait_for_workers(self, n: int) -> None:
        with self.client() as client:
            try:
                client.wait_for_workers(n, timeout=START_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(f"{n} Dask workers did not start in time") from None

    def worker_pids(self) -> set[int]:
        with self.client() as client:
            return set(client.run(os.getpid).values())

    def scheduler_tasks(self) -> int:
        with self.client() as client:
            return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            # the whole session: a nanny's worker child, whatever outlived its parent
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    """A scheduler and two single-threaded workers, shared by the tests of this module."""
    cluster = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        for i in (1, 2):
            cluster.add_worker(f"worker{i}")
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.close()


def make_project(folder: Path, images: dict[str, np.ndarray] | None = None) -> Path:
    """A project folder: the pretrained project and ``images`` (default: the 3 reference
    images) in ``ilastik_img``."""
    (folder / "ilastik_img").mkdir(parents=True)
    shutil.copy(EXAMPLE / "pretrained.ilp", folder / "pixel_classifier.ilp")
    if images is None:
        for f in REF_IMG.glob("*.h5"):
            shutil.copy(f, folder / "ilastik_img")
    else:
        for name, img in images.items():
            with h5py.File(folder / "ilastik_img" / f"{name}.h5", "w") as h5:
                h5["img"] = img
    return folder


def large_images(n: int, tiles: int) -> dict[str, np.ndarray]:
    """Images of ``tiles`` x ``tiles`` reference images (cropped to one size), flipped
    differently: with 7 x 7 tiles, one takes about a second on one thread."""
    sources = []
    for f in sorted(REF_IMG.glob("*.h5")):
        with h5py.File(f, "r") as h5:
            sources.append(h5["img"][()])
    side = min(min(img.shape[1:]) for img in sources)
    sources = [img[:, :side, :side] for img in sources]
    rng = np.random.default_rng(11)
    images = {}
    for i in range(n):
        rows = []
        for _ in range(tiles):
            row = []
            for _ in range(tiles):
                tile = sources[rng.integers(len(sources))]
                row.append(tile[:, :: rng.choice([-1, 1]), :: rng.choice([-1, 1])])
            rows.append(np.concatenate(row, axis=2))
        images[f"large_{i + 1}"] = np.ascontiguousarray(np.concatenate(rows, axis=1))
    return images


def cli(folder: Path, *args: str, env: dict[str, str] | None = None):
    old = Path.cwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(
            main, ["classify", "ilastik", "run", *args], env=env, catch_exceptions=False
        )
    finally:
        os.chdir(old)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def local_outputs(project: Path, *args: str, exit_code: int = 0) -> dict[str, bytes]:
    result = cli(project, "-o", "local", *args)
    assert result.exit_code == exit_code, result.output
    return files(project / "local")


def test_outputs_are_byte_identical_to_a_local_run(cluster, tmp_path):
    project = make_project(tmp_path / "p")
    result = cli(project, "--dask", cluster.address)
    assert result.exit_code == 0, result.output
    assert "Dask: " in result.stderr and "2 workers" in result.stderr
    assert sorted(result.stdout.splitlines()) == [
        f"ilastik_probabilities/{f.stem}.tiff" for f in sorted(REF_IMG.glob("*.h5"))
    ]
    assert [f"[{i}/3]" in result.stderr for i in (1, 2, 3)] == [True] * 3
    assert files(project / "ilastik_probabilities") == local_outputs(project)

    # the scheduler file, and the rerun rule: nothing left to do, no task sent
    result = cli(project, "--dask-scheduler-file", str(cluster.scheduler_file))
    assert result.exit_code == 0 and result.stdout == ""
    assert "3 of 3 outputs are finished already" in result.stderr
    # STEINPIX_DASK, and images given as files
    out = project / "ilastik_probabilities"
    (out / "20210305_NE_mockData1_002.tiff").unlink()
    result = cli(
        project,
        "ilastik_img/20210305_NE_mockData1_002.h5",
        "ilastik_img/20210305_NE_mockData1_003.h5",
        env={"STEINPIX_DASK": cluster.address},
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["ilastik_probabilities/20210305_NE_mockData1_002.tiff"]
    assert "Dask: " in result.stderr
    assert files(out) == local_outputs(project)
    # ilastik's other exports come from the workers too
    result = cli(project, "--dask", cluster.address, "-o", "dask", "--segmentation", "seg")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 6
    assert files(project / "dask") == local_outputs(project, "--segmentation", "local_seg")
    assert files(project / "seg") == files(project / "local_seg")


def test_a_bad_image_among_good_ones(cluster, tmp_path):
    project = make_project(tmp_path / "p")
    bad = project / "ilastik_img" / "20210305_NE_mockData1_002.h5"
    with h5py.File(bad, "w") as h5:
        h5["other"] = np.zeros((4, 60, 60), np.float32)
    expected = local_outputs(project, exit_code=1)  # the two good images
    result = cli(project, "--dask", cluster.address)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    (error,) = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert f"{bad.resolve()}: no 'img' dataset" in error and "(worker tcp://127.0.0.1:" in error
    assert result.output.rstrip().endswith(f"Error: 1 of 3 images failed: ilastik_img/{bad.name}")
    assert files(project / "ilastik_probabilities") == expected


def test_ilastik_on_the_workers_in_chunks(cluster, tmp_path):
    project = make_project(tmp_path / "p")
    for i in range(4, 6):
        shutil.copy(REF_IMG / "20210305_NE_mockData1_001.h5", project / f"ilastik_img/x{i}.h5")
    fake = FakeIlastik(tmp_path / "ilastik")
    args = ("--dask", cluster.address, "--engine", "ilastik", "--ilastik", str(fake.path))
    result = cli(project, *args, "--chunk", "2")
    assert result.exit_code == 0, result.output
    calls = fake.calls()
    assert sorted(len([a for a in c["argv"] if not a.startswith("--")]) for c in calls) == [1, 2, 2]
    assert {c["env"]["LAZYFLOW_THREADS"] for c in calls} == {"1"}  # the workers' threads
    assert len(result.stdout.splitlines()) == 5 and "[5/5]" in result.stderr
    assert not [p for p in (project / "ilastik_probabilities").iterdir() if p.name[0] == "."]


def test_unreachable_scheduler_is_one_line_and_fast(tmp_path):
    project = make_project(tmp_path / "p")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    result = cli(project, "--dask", address, env={"STEINPIX_DASK_TIMEOUT": "1"})
    assert time.monotonic() - start < 30
    assert result.exit_code == 2
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert f"Error: Dask scheduler {address} not reachable within 1 s" in result.stderr
    assert not (project / "ilastik_probabilities").exists() or not any(
        (project / "ilastik_probabilities").iterdir()
    )


def test_malformed_address_is_one_line_and_fast(tmp_path):
    # a real process: a half-built Client would print a traceback at exit, after a wait
    project = make_project(tmp_path / "p")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "--dask", "tcp://h:x"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - start < 15
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("Error:") == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "Error: Dask scheduler tcp://h:x: not a valid address ("
    )


def test_bad_scheduler_file(tmp_path):
    project = make_project(tmp_path / "p")
    (project / "scheduler.json").write_text("{}")
    env = {"STEINPIX_DASK_TIMEOUT": "0.5"}  # how long steinpix waits for the file to be complete
    result = cli(project, "--dask-scheduler-file", "scheduler.json", env=env)
    assert result.exit_code == 2
    assert "Error: scheduler.json: not a Dask scheduler file" in result.stderr
    result = cli(project, "--dask-scheduler-file", "missing.json", env=env)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: missing.json: cannot read the scheduler file (No such file or directory)"
    )


def run_and_kill(project: Path, address: str, pick, timeout: float = START_TIMEOUT_S):
    """``run --mem 300 --dask address`` in a process of its own; while it runs, SIGKILL each
    process that ``pick(temporary name, pid, pids killed so far)`` chooses among those that
    write a temporary output. Small strips (``--mem 300``): an output is written under its
    temporary name for most of its task. Returns (exit code, stdout, stderr, pids killed)."""
    run = subprocess.Popen(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "--mem", "300"]
        + ["--dask", address],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out_dir = project / "ilastik_probabilities"
    killed: list[int] = []
    try:
        deadline = time.monotonic() + timeout
        while run.poll() is None and time.monotonic() < deadline:
            for entry in os.scandir(out_dir) if out_dir.is_dir() else []:
                match = TEMPORARY.match(entry.name)
                pid = int(match[1]) if match else 0
                if match and pid not in killed and pick(entry.name, pid, killed):
                    killed.append(pid)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        stdout, stderr = run.communicate(timeout=START_TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return run.returncode, stdout, stderr, killed


def test_killed_worker_loses_and_corrupts_nothing(cluster, tmp_path):
    project = make_project(tmp_path / "p", large_images(3, tiles=5))
    expected = local_outputs(project, "--mem", "300")
    workers = cluster.worker_pids()
    # one worker, in the middle of writing an output
    code, stdout, stderr, killed = run_and_kill(
        project, cluster.address, lambda name, pid, killed: not killed and pid in workers
    )
    assert killed, "the batch ended before a worker could be killed mid-task"
    assert not pid_alive(killed[0])
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 3 and "[3/3]" in stderr
    out_dir = project / "ilastik_probabilities"
    assert files(out_dir) == expected  # complete, byte for byte, and no temporary left behind
    cluster.wait_for_workers(2)  # the nanny restarted the killed worker


def test_task_that_keeps_killing_its_worker_fails_alone(tmp_path, monkeypatch):
    # Dask gives up on a task whose workers died more often than its allowed failures
    # (distributed.scheduler.allowed-failures: 3 by default, 1 here to be quick): that image
    # fails with a one-line reason, the others are written, and no temporary is left.
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "1")
    project = make_project(tmp_path / "p")
    with h5py.File(project / "ilastik_img" / "doomed.h5", "w") as h5:
        # large enough that its temporary lives far longer than the watcher's scans take
        h5["img"] = large_images(1, tiles=8)["large_1"]
    good = [f.stem for f in sorted(REF_IMG.glob("*.h5"))]
    expected = local_outputs(project, "--mem", "300")
    doomed = expected.pop("doomed.tiff")
    local = Cluster(tmp_path / "cluster")
    try:
        for i in (1, 2):
            local.add_worker(f"worker{i}")
        local.wait_for_workers(2)
        # whichever worker writes the doomed image, every time
        code, stdout, stderr, killed = run_and_kill(
            project,
            local.address,
            lambda name, pid, killed: name.startswith(".doomed.") and pid_alive(pid),
            timeout=4 * START_TIMEOUT_S,
        )
    finally:
        local.close()
    assert len(killed) == 2, (killed, stderr)  # the first try and the one retry allowed
    assert code == 1, stderr
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if " ERROR " in line]
    assert "doomed.h5: its task ended the worker process several times" in error
    assert "Dask gave up on it" in error
    assert stderr.rstrip().endswith("Error: 1 of 4 images failed: ilastik_img/doomed.h5")
    assert sorted(stdout.splitlines()) == [f"ilastik_probabilities/{g}.tiff" for g in good]
    out_dir = project / "ilastik_probabilities"
    written = files(out_dir)
    # a kill that lands just after the worker renamed its finished output (the watcher saw the
    # temporary a moment before) leaves that output whole: then it must be the right one
    assert written.pop("doomed.tiff", doomed) == doomed
    assert written == expected  # no temporary of the killed workers is left


def test_ctrl_c_cancels_the_remaining_tasks(cluster, tmp_path):
    project = make_project(tmp_path / "p", large_images(5, tiles=5))
    run = subprocess.Popen(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", "--dask", cluster.address],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = run.stdout.readline()  # the first image is finished
        assert first.startswith("ilastik_probabilities/"), run.stderr.read()
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    assert "Cancelling" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 30
    while cluster.scheduler_tasks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.scheduler_tasks() == 0
    time.sleep(1)  # tasks that were running finish their image; nothing else starts
    assert len(list((project / "ilastik_probabilities").glob("*.tiff"))) < 5


def _can_hide_folders() -> bool:
    probe = Path("/tmp") / f"steinpix-unshare-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        return (
            shutil.which("unshare") is not None
            and subprocess.run(
                ["unshare", "--mount", "--propagation", "private"]
                + ["sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(probe)],
                capture_output=True,
            ).returncode
            == 0
        )
    finally:
        probe.rmdir()


@pytest.mark.skipif(
    not _can_hide_folders(), reason="needs root and mount namespaces (unshare) to hide a folder"
)
def test_worker_that_cannot_see_the_data(tmp_path):
    project = make_project(tmp_path / "data" / "p")
    blind = Cluster(tmp_path / "cluster")
    try:
        # this worker runs in its own mount namespace, where an empty file system covers
        # the data folder: as on a node that lacks the shared mount
        hide = ("unshare", "--mount", "--propagation", "private", "sh", "-c")
        hide += ('mount -t tmpfs tmpfs "$0" && exec "$@"', str(tmp_path / "data"))
        blind.add_worker("blind", prefix=hide)
        blind.wait_for_workers(1)
        result = cli(project, "--dask", blind.address)
    finally:
        blind.close()
    assert result.exit_code == 2
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    error = result.stderr.splitlines()[-1]
    assert error.startswith("Error: the Dask worker tcp://127.0.0.1:")
    assert f"cannot see {project.resolve() / 'pixel_classifier.ilp'}" in error


def test_dask_imported_only_for_dask_and_missing_dask_is_one_line(tmp_path):
    project = make_project(tmp_path / "p")
    code = (
        "import sys\n"
        "from steinpix._cli.main import main\n"
        "def run(*args):\n"
        "    try:\n"
        "        main(['classify', 'ilastik', 'run', '-v', 'WARNING', *args])\n"
        "    except SystemExit as e:\n"
        "        return e.code\n"
        "assert run() == 0\n"
        "print('distributed' in sys.modules)\n"
        "sys.modules['distributed'] = None  # `import distributed` fails, as without the extra\n"
        "print(run('--dask', 'tcp://127.0.0.1:8786', '--overwrite'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0 and lines[-2:] == ["False", "2"], result.stderr
    assert result.stderr.decode().splitlines() == [
        "Error: --dask needs Dask's distributed package: pip install 'steinpix[dask]'"
    ]


def steinpix_run(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "steinpix", "classify", "ilastik", "run", *args],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_a_batch_whose_every_image_fails_leaves_no_empty_folders(cluster, tmp_path):
    project = make_project(tmp_path / "p")
    for bad in (project / "ilastik_img").iterdir():
        bad.write_bytes(b"not an HDF5 file")
    run = steinpix_run(project, "--dask", cluster.address, "--uncertainty", "unc/new")
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1
    assert stderr.splitlines()[-1].startswith("Error: 3 of 3 images failed: ")
    # every task had finished: nothing can write into the folders this command created
    assert sorted(p.name for p in project.iterdir()) == ["ilastik_img", "pixel_classifier.ilp"]


def test_ctrl_c_keeps_the_empty_folders_a_running_task_writes_into(cluster, tmp_path):
    # Dask cannot stop a task that is running: its outputs come after the command has ended,
    # so the folders the command created stay even when they are still empty
    project = make_project(tmp_path / "p")
    fake = FakeIlastik(tmp_path / "ilastik").configure(slow_on=["20210305_NE_mockData1_001"])
    run = steinpix_run(
        project, "--dask", cluster.address, "--engine", "ilastik", "--ilastik", str(fake.path),
        "--uncertainty", "unc", "ilastik_img/20210305_NE_mockData1_001.h5",
    )
    try:
        fake.wait_for("started", timeout=120)  # the probabilities; the uncertainty comes next
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 1 and "Cancelling 1 Dask tasks" in stderr, stderr
        assert (project / "unc").is_dir()
        assert (project / "ilastik_probabilities").is_dir()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for call in fake.calls():  # the task ends (ilastik failed) and frees its worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(call["pid"], signal.SIGINT)
        deadline = time.monotonic() + 30
        while any(pid_alive(c["pid"]) for c in fake.calls()) and time.monotonic() < deadline:
            time.sleep(0.05)
