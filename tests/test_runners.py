"""The contract with ilastik (a fake executable, real subprocesses) and with the Docker SDK."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import tifffile
from fake_ilastik import FakeIlastik, StandInDockerClient, pid_alive

from steinpix import runners
from steinpix.errors import SteinpixError

from conftest import EXAMPLE, TEST_DATA

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")

REFERENCE_IMG = TEST_DATA / "reference" / "ilastik_img"
REFERENCE_PROBABILITIES = TEST_DATA / "reference" / "ilastik_probabilities"
PRETRAINED = EXAMPLE / "pretrained.ilp"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def fake(tmp_path: Path) -> FakeIlastik:
    return FakeIlastik(tmp_path / "ilastik")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A data folder with a project and five (empty) ilastik images; the fake only checks that
    the images exist."""
    data = tmp_path / "data"
    (data / "ilastik_img").mkdir(parents=True)
    (data / "pixel_classifier.ilp").write_bytes(b"ilp")
    for i in range(1, 6):
        (data / "ilastik_img" / f"img_{i}.h5").write_bytes(b"h5")
    return data


def images(project: Path) -> list[Path]:
    return sorted((project / "ilastik_img").glob("*.h5"))


@pytest.fixture
def log_records():
    """Records of the ``steinpix`` logger (which the CLI may detach from the root logger)."""
    records: list[logging.LogRecord] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = ListHandler(level=logging.DEBUG)
    steinpix_logger = logging.getLogger("steinpix")
    old_level = steinpix_logger.level
    steinpix_logger.addHandler(handler)
    steinpix_logger.setLevel(logging.DEBUG)
    yield records
    steinpix_logger.removeHandler(handler)
    steinpix_logger.setLevel(old_level)


def leftovers(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# find_ilastik


def test_find_ilastik_explicit(fake: FakeIlastik, monkeypatch):
    monkeypatch.setenv(runners.ILASTIK_ENV_VAR, "/nonexistent/from-env")
    assert runners.find_ilastik(fake.path) == fake.path  # --ilastik wins over the environment


def test_find_ilastik_environment(fake: FakeIlastik, monkeypatch):
    monkeypatch.setenv(runners.ILASTIK_ENV_VAR, str(fake.path))
    assert runners.find_ilastik() == fake.path


def test_find_ilastik_default_location_then_path(fake: FakeIlastik, tmp_path, monkeypatch):
    monkeypatch.delenv(runners.ILASTIK_ENV_VAR, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    on_path = bin_dir / "run_ilastik.sh"
    shutil.copy2(fake.path, on_path)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(runners, "DEFAULT_ILASTIK", str(fake.path))
    assert runners.find_ilastik() == fake.path
    monkeypatch.setattr(runners, "DEFAULT_ILASTIK", str(tmp_path / "opt" / "run_ilastik.sh"))
    assert runners.find_ilastik() == on_path
    assert runners.find_ilastik("run_ilastik.sh") == on_path  # a bare name is looked up on PATH


@pytest.mark.parametrize("where", ["explicit", "environment", "nowhere"])
def test_find_ilastik_not_found(where, tmp_path, monkeypatch):
    monkeypatch.delenv(runners.ILASTIK_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(runners, "DEFAULT_ILASTIK", str(tmp_path / "opt" / "run_ilastik.sh"))
    missing = tmp_path / "no" / "run_ilastik.sh"
    if where == "environment":
        monkeypatch.setenv(runners.ILASTIK_ENV_VAR, str(missing))
    with pytest.raises(SteinpixError) as info:
        runners.find_ilastik(missing if where == "explicit" else None)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in message
    assert "--engine builtin" in message
    if where != "nowhere":
        assert str(missing) in message


def test_find_ilastik_not_executable(tmp_path):
    script = tmp_path / "run_ilastik.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(SteinpixError, match="not an executable") as info:
        runners.find_ilastik(script)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------------
# environment and arguments


def test_ilastik_env_cleans_and_sets_limits():
    base = {
        "PYTHONPATH": "/x",
        "PYTHONHOME": "/y",
        "LD_LIBRARY_PATH": "/z",
        "HOME": "/home/me",
        "PATH": "/bin",
    }
    env = runners.ilastik_env(base=base)
    assert env == {"HOME": "/home/me", "PATH": "/bin"}
    assert "PYTHONPATH" in base  # the caller's mapping is not changed
    env = runners.ilastik_env(threads=3, mem=2048, base=base)
    assert env["LAZYFLOW_THREADS"] == "3"
    assert env["LAZYFLOW_TOTAL_RAM_MB"] == "2048"
    assert runners.ilastik_env(mem=512, base={})["LAZYFLOW_TOTAL_RAM_MB"] == "512"
    assert "LAZYFLOW_THREADS" not in runners.ilastik_env(mem=512, base={})


def test_ilastik_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("STEINPIX_TEST_MARKER", "kept")
    env = runners.ilastik_env()
    assert "PYTHONPATH" not in env
    assert env["STEINPIX_TEST_MARKER"] == "kept"


def test_headless_args_are_steinbocks():
    args = runners.headless_args(
        Path("pixel_classifier.ilp"),
        [Path("ilastik_img/a.h5"), Path("ilastik_img/b.h5")],
        Path("ilastik_probabilities"),
    )
    assert args == [
        "--headless",
        "--project=pixel_classifier.ilp",
        "--readonly",
        "--input_axes=cyx",
        "--export_source=Probabilities",
        "--output_format=tiff",
        "--output_filename_format=ilastik_probabilities/{nickname}.tiff",
        "--export_dtype=uint16",
        "--output_axis_order=yxc",
        "--pipeline_result_drange=(0.0,1.0)",
        "--export_drange=(0,65535)",
        "ilastik_img/a.h5/img",
        "ilastik_img/b.h5/img",
    ]


def test_headless_args_keep_container_paths_posix():
    args = runners.headless_args(
        PurePosixPath("/data/p.ilp"), [PurePosixPath("/data/i/a.h5")], PurePosixPath("/data/o")
    )
    assert args[6] == "--output_filename_format=/data/o/{nickname}.tiff"
    assert args[-1] == "/data/i/a.h5/img"


def test_split_chunks():
    items = [Path(str(i)) for i in range(5)]
    assert runners.split_chunks(items, None) == [items]
    assert [len(c) for c in runners.split_chunks(items, 2)] == [2, 2, 1]
    assert runners.split_chunks(items, 9) == [items]
    assert runners.split_chunks([], 2) == []
    with pytest.raises(SteinpixError):
        runners.split_chunks(items, 0)


# --------------------------------------------------------------------------------------------
# run_ilastik against the fake


def test_run_ilastik_writes_renamed_outputs(fake, project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setenv("PYTHONPATH", "/must/not/reach/ilastik")
    monkeypatch.setenv("PYTHONHOME", "/must/not/reach/ilastik")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/must/not/reach/ilastik")
    monkeypatch.delenv("LAZYFLOW_THREADS", raising=False)
    monkeypatch.delenv("LAZYFLOW_TOTAL_RAM_MB", raising=False)
    files = [Path("ilastik_img") / f.name for f in images(project)][:3]
    failed = runners.run_ilastik(
        fake.path, Path("pixel_classifier.ilp"), files, Path("ilastik_probabilities")
    )
    assert failed == []
    out_dir = project / "ilastik_probabilities"
    assert sorted(p.name for p in out_dir.iterdir()) == ["img_1.tiff", "img_2.tiff", "img_3.tiff"]
    for output in out_dir.iterdir():
        assert output.read_bytes() == fake.tiff.read_bytes()  # ilastik's bytes, untouched

    (call,) = fake.calls()
    tmp_dirs = {Path(a.split("=", 1)[1]).parent for a in call["argv"] if "filename_format" in a}
    (tmp_dir,) = tmp_dirs
    assert tmp_dir.parent == out_dir and tmp_dir.name.startswith(f".steinpix-{os.getpid()}-")
    assert call["argv"] == runners.headless_args(
        project / "pixel_classifier.ilp", [project / f for f in files], tmp_dir
    )
    for name in ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LAZYFLOW_THREADS"):
        assert name not in call["env"]
    assert "LAZYFLOW_TOTAL_RAM_MB" not in call["env"]
    assert call["env"]["PATH"] == os.environ["PATH"]


def test_run_ilastik_sets_lazyflow_limits(fake, project):
    runners.run_ilastik(
        fake.path,
        project / "pixel_classifier.ilp",
        images(project)[:1],
        project / "out",
        threads=3,
        mem=1234,
    )
    (call,) = fake.calls()
    assert call["env"]["LAZYFLOW_THREADS"] == "3"
    assert call["env"]["LAZYFLOW_TOTAL_RAM_MB"] == "1234"


def test_run_ilastik_chunks(fake, project, log_records):
    files = images(project)
    failed = runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", files, project / "out", chunk=2
    )
    assert failed == []
    calls = fake.calls()
    assert len(calls) == 3
    inputs = [[a for a in c["argv"] if not a.startswith("--")] for c in calls]
    assert inputs == [[f"{f}/img" for f in files[i : i + 2]] for i in (0, 2, 4)]
    # one hidden folder per chunk, all removed
    assert len({c["argv"][6] for c in calls}) == 3
    assert leftovers(project / "out") == []
    assert sorted(p.name for p in (project / "out").iterdir()) == [
        f"img_{i}.tiff" for i in range(1, 6)
    ]
    assert any("chunk 3/3" in r.getMessage() for r in log_records)


def test_run_ilastik_failing_chunk_keeps_others(fake, project, log_records):
    files = images(project)
    out_dir = project / "out"
    out_dir.mkdir()
    (out_dir / "img_3.tiff").write_bytes(b"an older complete result")
    fake.configure(fail_on=["img_4"], fail_code=7)
    failed = runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", files, out_dir, chunk=2
    )
    assert failed == files[2:4]
    assert len(fake.calls()) == 3  # later chunks still run
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["img_1.tiff", "img_2.tiff", "img_3.tiff", "img_5.tiff"]
    # img_3 was exported before ilastik failed on img_4, but its chunk failed: not used
    assert (out_dir / "img_3.tiff").read_bytes() == b"an older complete result"
    errors = [r.getMessage() for r in log_records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "chunk 2/3" in errors[0] and "exit code 7" in errors[0]
    assert "img_3.h5" in errors[0] and "img_4.h5" in errors[0]


def test_run_ilastik_missing_output_counts_as_failed(fake, project, log_records):
    fake.configure(no_output=["img_2"])
    files = images(project)[:3]
    failed = runners.run_ilastik(fake.path, project / "pixel_classifier.ilp", files, project / "o")
    assert failed == [files[1]]
    assert sorted(p.name for p in (project / "o").iterdir()) == ["img_1.tiff", "img_3.tiff"]
    assert any("img_2.h5" in r.getMessage() for r in log_records if r.levelno == logging.ERROR)


def test_run_ilastik_output_streams_to_stderr(fake, project, capfd):
    runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", images(project)[:1], project / "o"
    )
    captured = capfd.readouterr()
    assert "fake ilastik: exported img_1-img.tiff" in captured.err
    assert "fake ilastik" not in captured.out  # stdout stays for steinpix's own output


def test_run_ilastik_nothing_to_do(fake, project):
    assert runners.run_ilastik(fake.path, project / "p.ilp", [], project / "o") == []
    assert fake.calls() == []


def test_run_ilastik_rejects_same_stem_twice(fake, project):
    other = project / "more" / "img_1.h5"
    other.parent.mkdir()
    other.write_bytes(b"h5")
    with pytest.raises(SteinpixError, match="img_1.tiff"):
        runners.run_ilastik(
            fake.path, project / "p.ilp", [images(project)[0], other], project / "o"
        )
    assert fake.calls() == []


@posix_only
def test_run_ilastik_cannot_start(project, tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    with pytest.raises(SteinpixError, match="cannot run ilastik") as info:
        runners.run_ilastik(broken, project / "p.ilp", images(project)[:1], project / "o")
    assert info.value.exit_code == 2
    assert leftovers(project / "o") == []


@posix_only
def test_run_ilastik_runs_in_its_own_session(fake, project):
    runners.run_ilastik(fake.path, project / "p.ilp", images(project)[:1], project / "o")
    (call,) = fake.calls()
    # steinpix, not the terminal, decides how ilastik stops (it forwards Ctrl-C)
    assert call["sid"] == call["pid"] and call["sid"] != os.getsid(0)


# --------------------------------------------------------------------------------------------
# Ctrl-C and termination: a driver process runs run_ilastik, the test signals the driver

DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from steinpix import runners

    spec = json.loads(sys.argv[1])
    runners.STOP_GRACE_S = spec["grace"]
    try:
        failed = runners.run_ilastik(
            spec["ilastik"], spec["ilp"], spec["files"], spec["out"], chunk=spec["chunk"]
        )
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(42)
    print("FINISHED", failed, flush=True)
    """
)


def start_driver(fake, project, tmp_path, grace=10.0) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    spec = {
        "ilastik": str(fake.path),
        "ilp": str(project / "pixel_classifier.ilp"),
        "files": [str(f) for f in images(project)[:3]],
        "out": str(project / "out"),
        "chunk": 1,
        "grace": grace,
    }
    return subprocess.Popen(
        [sys.executable, str(driver), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_interrupted_cleanly(driver, fake, project):
    try:
        stdout, stderr = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        driver.kill()
        raise
    assert driver.returncode == 42, stdout + stderr
    assert "INTERRUPTED" in stdout
    for call in fake.calls():
        assert not pid_alive(call["pid"]), "ilastik is still running"
    out_dir = project / "out"
    # the first chunk had finished: its output stays; the interrupted one left nothing
    assert sorted(p.name for p in out_dir.iterdir()) == ["img_1.tiff"]
    assert (out_dir / "img_1.tiff").read_bytes() == fake.tiff.read_bytes()
    return stderr


@posix_only
@pytest.mark.parametrize("wrapper", [False, True], ids=["python", "shell-wrapper"])
def test_ctrl_c_stops_ilastik_and_cleans_up(tmp_path, project, wrapper):
    fake = FakeIlastik(tmp_path / "ilastik", wrapper=wrapper).configure(slow_on=["img_2"])
    driver = start_driver(fake, project, tmp_path)
    fake.wait_for("started")
    driver.send_signal(signal.SIGINT)
    assert_interrupted_cleanly(driver, fake, project)
    assert len(fake.markers("interrupted")) == 1  # ilastik itself got the SIGINT
    assert len(fake.calls()) == 2  # the third chunk never started


@posix_only
def test_sigterm_stops_ilastik_and_cleans_up(fake, tmp_path, project):
    fake.configure(slow_on=["img_2"])
    driver = start_driver(fake, project, tmp_path)
    fake.wait_for("started")
    driver.send_signal(signal.SIGTERM)
    assert_interrupted_cleanly(driver, fake, project)
    assert len(fake.markers("interrupted")) == 1


@posix_only
def test_ilastik_that_ignores_signals_is_killed(fake, tmp_path, project):
    fake.configure(slow_on=["img_2"], ignore_signals=True)
    driver = start_driver(fake, project, tmp_path, grace=0.3)
    fake.wait_for("started")
    driver.send_signal(signal.SIGINT)
    assert_interrupted_cleanly(driver, fake, project)
    assert fake.markers("interrupted") == []  # it never reacted: SIGKILL ended it


# --------------------------------------------------------------------------------------------
# real ilastik (only where STEINPIX_TEST_ILASTIK names a binary)


@pytest.fixture(scope="module")
def real_ilastik_outputs(tmp_path_factory) -> Path:
    binary = os.environ.get("STEINPIX_TEST_ILASTIK")
    if not binary:
        pytest.skip("set STEINPIX_TEST_ILASTIK to an ilastik 1.3.3post3 run_ilastik.sh to run")
    out_dir = tmp_path_factory.mktemp("real-ilastik") / "ilastik_probabilities"
    files = sorted(REFERENCE_IMG.glob("*.h5"))
    failed = runners.run_ilastik(runners.find_ilastik(binary), PRETRAINED, files, out_dir)
    assert failed == []
    return out_dir


def reference_pairs(out_dir: Path) -> list[tuple[Path, Path]]:
    references = sorted(REFERENCE_PROBABILITIES.glob("*.tiff"))
    assert references
    assert sorted(p.name for p in out_dir.iterdir()) == [r.name for r in references]
    return [(r, out_dir / r.name) for r in references]


def test_real_ilastik_matches_reference_pixels(real_ilastik_outputs):
    for reference, output in reference_pairs(real_ilastik_outputs):
        expected, actual = tifffile.imread(reference), tifffile.imread(output)
        assert actual.dtype == expected.dtype == np.uint16
        np.testing.assert_array_equal(actual, expected, err_msg=output.name)


def test_real_ilastik_matches_reference_bytes(real_ilastik_outputs):
    for reference, output in reference_pairs(real_ilastik_outputs):
        assert output.read_bytes() == reference.read_bytes(), output.name


# --------------------------------------------------------------------------------------------
# Docker engine against a stand-in client


@pytest.fixture
def docker_sdk():
    return pytest.importorskip("docker", reason="the Docker SDK (steinpix[docker]) is needed")


def exporting_client(data_dir: Path, **kwargs) -> StandInDockerClient:
    """A stand-in whose containers export like ilastik would, into the mounted data folder."""

    def export(container) -> None:
        args = container.settings["command"]
        fmt = next(a.split("=", 1)[1] for a in args if a.startswith("--output_filename_format="))
        for arg in args:
            if arg.startswith("--"):
                continue
            stem = PurePosixPath(arg).parent.stem
            target = fmt.replace("{nickname}", f"{stem}-img")
            host = data_dir / PurePosixPath(target).relative_to("/data")
            host.write_bytes(b"tiff from " + stem.encode())

    kwargs.setdefault("images", (runners.DEFAULT_DOCKER_IMAGE,))
    return StandInDockerClient(on_start=export, **kwargs)


def test_run_docker_container_settings(docker_sdk, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    monkeypatch.setenv("PYTHONPATH", "/host/only")
    client = exporting_client(project, log_chunks=[b"ilastik says hi\n", b"and bye\n"])
    files = [Path("ilastik_img") / f.name for f in images(project)[:2]]
    failed = runners.run_docker(
        Path("pixel_classifier.ilp"), files, Path("probs"), threads=4, mem=3000, client=client
    )
    assert failed == []
    assert (project / "probs" / "img_1.tiff").read_bytes() == b"tiff from img_1"
    assert leftovers(project / "probs") == []
    (container,) = client.containers.created
    settings = container.settings
    assert settings["image"] == runners.DEFAULT_DOCKER_IMAGE
    assert settings["entrypoint"] == ["/opt/ilastik/run_ilastik.sh"]
    tmp_arg = settings["command"][6]
    tmp_dir = PurePosixPath(tmp_arg.split("=", 1)[1]).parent
    assert tmp_dir.parent == PurePosixPath("/data/probs")
    assert tmp_dir.name.startswith(".steinpix-")
    assert settings["command"] == runners.headless_args(
        PurePosixPath("/data/pixel_classifier.ilp"),
        [PurePosixPath("/data/ilastik_img/img_1.h5"), PurePosixPath("/data/ilastik_img/img_2.h5")],
        tmp_dir,
    )
    assert settings["volumes"] == {str(project.resolve()): {"bind": "/data", "mode": "rw"}}
    assert settings["working_dir"] == "/data"
    assert settings["user"] == f"{os.getuid()}:{os.getgid()}"
    assert settings["environment"] == {
        "HOME": "/tmp",
        "LAZYFLOW_THREADS": "4",
        "LAZYFLOW_TOTAL_RAM_MB": "3000",
    }
    assert settings["init"] is True
    assert settings["network_mode"] == "none"
    assert container.events == ["start", "logs", "wait", "remove(force=True)"]
    assert capsys.readouterr().err.endswith("ilastik says hi\nand bye\n")


def test_run_docker_chunks_and_failures(docker_sdk, project):
    client = exporting_client(project, exit_codes=[0, 1, 0])
    files = images(project)
    failed = runners.run_docker(
        project / "pixel_classifier.ilp",
        files,
        project / "o",
        chunk=2,
        client=client,
        data_dir=project,
    )
    assert len(client.containers.created) == 3
    assert failed == files[2:4]
    assert sorted(p.name for p in (project / "o").iterdir()) == [
        "img_1.tiff",
        "img_2.tiff",
        "img_5.tiff",
    ]
    for container in client.containers.created:
        assert "remove(force=True)" in container.events
        assert "LAZYFLOW_THREADS" not in container.settings["environment"]


def test_run_docker_ctrl_c_stops_and_removes(docker_sdk, project):
    client = exporting_client(project, log_chunks=[b"working\n", KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        runners.run_docker(
            project / "pixel_classifier.ilp",
            images(project),
            project / "o",
            client=client,
            data_dir=project,
        )
    (container,) = client.containers.created
    assert container.events[-2:] == [
        f"stop(timeout={int(runners.STOP_GRACE_S)})",
        "remove(force=True)",
    ]
    assert list((project / "o").iterdir()) == []  # outputs of the stopped run are dropped


def test_run_docker_rootless_runs_as_container_root(docker_sdk, project):
    client = exporting_client(project)
    client.info = lambda: {"SecurityOptions": ["name=seccomp,profile=builtin", "name=rootless"]}
    runners.run_docker(
        project / "pixel_classifier.ilp",
        images(project)[:1],
        project / "o",
        client=client,
        data_dir=project,
    )
    assert client.containers.created[0].settings["user"] == "0:0"


def test_run_docker_daemon_unreachable(docker_sdk, project):
    client = StandInDockerClient(reachable=False)
    with pytest.raises(SteinpixError, match="Docker daemon not reachable") as info:
        runners.run_docker(
            project / "p.ilp", images(project), project / "o", client=client, data_dir=project
        )
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not (project / "o").exists()


def test_run_docker_no_daemon_with_the_real_sdk(docker_sdk, project, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(SteinpixError, match="Docker daemon not reachable") as info:
        runners.run_docker(project / "p.ilp", images(project), project / "o", data_dir=project)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_run_docker_image_missing(docker_sdk, project):
    client = StandInDockerClient(images=())
    with pytest.raises(SteinpixError, match="steinpix:latest not found") as info:
        runners.run_docker(
            project / "p.ilp", images(project), project / "o", client=client, data_dir=project
        )
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert client.containers.created == []


def test_run_docker_path_outside_data_dir(docker_sdk, project, tmp_path):
    outside = tmp_path / "elsewhere" / "x.h5"
    with pytest.raises(SteinpixError, match="outside the data directory") as info:
        runners.run_docker(
            project / "p.ilp",
            [outside],
            project / "o",
            client=exporting_client(project),
            data_dir=project,
        )
    assert info.value.exit_code == 2


def test_run_docker_symlink_out_of_data_dir(docker_sdk, project, tmp_path):
    real = tmp_path / "scratch"
    real.mkdir()
    (project / "linked").symlink_to(real)
    with pytest.raises(SteinpixError, match="outside the data directory"):
        runners.run_docker(
            project / "p.ilp",
            images(project),
            project / "linked" / "o",
            client=exporting_client(project),
            data_dir=project,
        )


def test_run_docker_without_the_sdk(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "docker", None)  # import docker raises ImportError
    with pytest.raises(SteinpixError, match=r"pip install 'steinpix\[docker\]'") as info:
        runners.run_docker(project / "p.ilp", images(project), project / "o", data_dir=project)
    assert info.value.exit_code == 2


def test_run_docker_real_daemon(tmp_path, monkeypatch):
    image = os.environ.get("STEINPIX_TEST_DOCKER_IMAGE")
    if not image:
        pytest.skip("set STEINPIX_TEST_DOCKER_IMAGE to a built steinpix image to run")
    data = tmp_path / "data"
    shutil.copytree(REFERENCE_IMG, data / "ilastik_img")
    shutil.copy2(PRETRAINED, data / "pretrained.ilp")
    monkeypatch.chdir(data)
    failed = runners.run_docker(
        Path("pretrained.ilp"), sorted(Path("ilastik_img").glob("*.h5")), Path("out"), image=image
    )
    assert failed == []
    for reference, output in reference_pairs(data / "out"):
        np.testing.assert_array_equal(tifffile.imread(output), tifffile.imread(reference))


# --------------------------------------------------------------------------------------------
# `classify ilastik run --engine ilastik|docker` on the command line


@pytest.fixture
def cli(project, monkeypatch):
    """Run ``steinpix classify ilastik run`` in the project folder; images and project are
    dated in the past so that new outputs count as finished."""
    pytest.importorskip("steinpix.engine", reason="the run command needs steinpix.engine")
    from click.testing import CliRunner

    from steinpix._cli.main import main

    past = 1_600_000_000
    for path in [project / "pixel_classifier.ilp", *images(project)]:
        os.utime(path, (past, past))
    monkeypatch.chdir(project)
    monkeypatch.delenv(runners.ILASTIK_ENV_VAR, raising=False)

    def run(*args: str, env: dict[str, str] | None = None):
        return CliRunner().invoke(
            main, ["classify", "ilastik", "run", *args], env=env, catch_exceptions=False
        )

    return run


def out_names(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "ilastik_probabilities").iterdir())


def test_cli_engine_ilastik(cli, fake, project):
    result = cli("--engine", "ilastik", "--ilastik", str(fake.path), "--threads", "2")
    assert result.exit_code == 0, result.output
    assert out_names(project) == [f"img_{i}.tiff" for i in range(1, 6)]
    (call,) = fake.calls()
    assert call["env"]["LAZYFLOW_THREADS"] == "2"
    assert call["argv"][1] == f"--project={project.resolve() / 'pixel_classifier.ilp'}"


def test_cli_engine_ilastik_from_environment(cli, fake, project):
    result = cli("--engine", "ilastik", env={runners.ILASTIK_ENV_VAR: str(fake.path)})
    assert result.exit_code == 0, result.output
    assert len(fake.calls()) == 1 and len(out_names(project)) == 5


def test_cli_engine_ilastik_not_found(cli, project, tmp_path):
    result = cli("--engine", "ilastik", "--ilastik", str(tmp_path / "nope.sh"))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ilastik not found")


def test_cli_failing_chunk_then_rerun(cli, fake, project):
    fake.configure(fail_on=["img_4"])
    result = cli("--engine", "ilastik", "--ilastik", str(fake.path), "--chunk", "2")
    assert result.exit_code != 0
    assert "2 of 5 images failed" in result.output
    assert out_names(project) == ["img_1.tiff", "img_2.tiff", "img_5.tiff"]
    assert len(fake.calls()) == 3

    fake.configure()  # ilastik works again: the rerun only classifies what is missing
    result = cli("--engine", "ilastik", "--ilastik", str(fake.path), "--chunk", "2")
    assert result.exit_code == 0, result.output
    rerun = fake.calls()[3:]
    assert len(rerun) == 1
    assert [a for a in rerun[0]["argv"] if not a.startswith("--")] == [
        f"{project.resolve() / 'ilastik_img' / name}/img" for name in ("img_3.h5", "img_4.h5")
    ]
    assert len(out_names(project)) == 5

    result = cli("--engine", "ilastik", "--ilastik", str(fake.path))
    assert result.exit_code == 0 and len(fake.calls()) == 4  # all finished: ilastik not started
    result = cli("--engine", "ilastik", "--ilastik", str(fake.path), "--overwrite")
    assert result.exit_code == 0
    assert len([a for a in fake.calls()[4]["argv"] if not a.startswith("--")]) == 5


def test_cli_engine_docker(cli, docker_sdk, project, monkeypatch):
    client = exporting_client(project.resolve())
    monkeypatch.setattr(docker_sdk, "from_env", lambda: client)
    result = cli("--engine", "docker", "--docker-image", runners.DEFAULT_DOCKER_IMAGE)
    assert result.exit_code == 0, result.output
    assert out_names(project) == [f"img_{i}.tiff" for i in range(1, 6)]
    (container,) = client.containers.created
    assert container.settings["command"][1] == "--project=/data/pixel_classifier.ilp"


# --------------------------------------------------------------------------------------------
# ilastik's other exports: Uncertainty and Simple Segmentation


def test_headless_args_of_the_other_exports():
    args = {
        export: runners.headless_args(Path("p.ilp"), [Path("i/a.h5")], Path("o"), export)
        for export in ("uncertainty", "segmentation")
    }
    common = ["--headless", "--project=p.ilp", "--readonly", "--input_axes=cyx"]
    out = ["--output_format=tiff", "--output_filename_format=o/{nickname}.tiff"]
    assert args["uncertainty"] == [
        *common,
        "--export_source=Uncertainty",
        *out,
        "--export_dtype=uint16",
        "--output_axis_order=yxc",
        "--pipeline_result_drange=(0.0,1.0)",
        "--export_drange=(0,65535)",
        "i/a.h5/img",
    ]
    assert args["segmentation"] == [
        *common,
        "--export_source=Simple Segmentation",
        *out,
        "--export_dtype=uint8",
        "--output_axis_order=yxc",
        "--pipeline_result_drange=(0,255)",
        "--export_drange=(0,255)",
        "i/a.h5/img",
    ]


def export_dirs(project: Path) -> dict[str, Path]:
    return {"uncertainty": project / "unc", "segmentation": project / "seg"}


def test_run_ilastik_other_exports_one_call_each(fake, project):
    files = images(project)[:3]
    exports = export_dirs(project)
    failed = runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", files, project / "out", exports=exports
    )
    assert failed == []
    calls = fake.calls()
    assert len(calls) == 3
    sources = {"probabilities": "Probabilities", "uncertainty": "Uncertainty",
               "segmentation": "Simple Segmentation"}
    for call, (export, folder) in zip(
        calls, {"probabilities": project / "out", **exports}.items(), strict=True
    ):
        fmt = next(a for a in call["argv"] if a.startswith("--output_filename_format="))
        tmp_dir = Path(fmt.split("=", 1)[1]).parent
        # each export into a hidden folder inside its own output folder
        assert tmp_dir.parent == folder and tmp_dir.name.startswith(".steinpix-")
        assert call["argv"] == runners.headless_args(
            project / "pixel_classifier.ilp", files, tmp_dir, export
        )
        assert sorted(p.name for p in folder.iterdir()) == [f"img_{i}.tiff" for i in (1, 2, 3)]
        for output in folder.iterdir():
            assert output.read_bytes() == fake.tiffs[sources[export]].read_bytes()


def test_run_ilastik_failing_export_fails_its_chunk(fake, project, log_records):
    files = images(project)
    exports = export_dirs(project)
    fake.configure(fail_on_source=["Uncertainty"], fail_code=5)
    failed = runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", files, project / "out", chunk=2,
        exports=exports,
    )
    assert failed == files
    # per chunk: probabilities, then the uncertainty fails: no segmentation call
    sources = [[a for a in c["argv"] if a.startswith("--export_source=")] for c in fake.calls()]
    assert sources == [["--export_source=Probabilities"], ["--export_source=Uncertainty"]] * 3
    # nothing of a failed chunk is moved into place, not even its probabilities
    for folder in (project / "out", *exports.values()):
        assert list(folder.iterdir()) == []
    errors = [r.getMessage() for r in log_records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert "uncertainty export" in errors[0] and "exit code 5" in errors[0]


def test_run_ilastik_failing_probabilities_skip_the_other_exports(fake, project):
    files = images(project)
    fake.configure(fail_on=["img_4"])
    failed = runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", files, project / "out", chunk=2,
        exports=export_dirs(project),
    )
    assert failed == files[2:4]
    assert len(fake.calls()) == 3 + 1 + 3
    for folder in (project / "out", *export_dirs(project).values()):
        assert sorted(p.name for p in folder.iterdir()) == [f"img_{i}.tiff" for i in (1, 2, 5)]
        assert leftovers(folder) == []


def test_run_ilastik_image_without_an_export_gets_nothing(fake, project, log_records):
    fake.configure(no_output=["img_2"])
    files = images(project)[:3]
    failed = runners.run_ilastik(
        fake.path, project / "pixel_classifier.ilp", files, project / "out",
        exports={"segmentation": project / "seg"},
    )
    assert failed == [files[1]]
    for folder in (project / "out", project / "seg"):
        assert sorted(p.name for p in folder.iterdir()) == ["img_1.tiff", "img_3.tiff"]
    assert any("img_2.h5" in r.getMessage() and "segmentation" in r.getMessage()
               for r in log_records if r.levelno == logging.ERROR)


def test_run_docker_other_exports(docker_sdk, project):
    client = exporting_client(project)
    files = images(project)[:2]
    failed = runners.run_docker(
        project / "pixel_classifier.ilp", files, project / "o", client=client,
        data_dir=project, exports=export_dirs(project),
    )
    assert failed == []
    commands = [c.settings["command"] for c in client.containers.created]
    assert [c[4] for c in commands] == [
        "--export_source=Probabilities",
        "--export_source=Uncertainty",
        "--export_source=Simple Segmentation",
    ]
    assert [PurePosixPath(c[6].split("=", 1)[1]).parent.parent for c in commands] == [
        PurePosixPath("/data/o"), PurePosixPath("/data/unc"), PurePosixPath("/data/seg")
    ]
    for folder in (project / "o", *export_dirs(project).values()):
        assert (folder / "img_2.tiff").read_bytes() == b"tiff from img_2"
        assert leftovers(folder) == []


def test_run_docker_export_folder_outside_data_dir(docker_sdk, project, tmp_path):
    client = exporting_client(project)
    with pytest.raises(SteinpixError, match="outside the data directory"):
        runners.run_docker(
            project / "pixel_classifier.ilp", images(project), project / "o", client=client,
            data_dir=project, exports={"uncertainty": tmp_path / "elsewhere"},
        )
    assert client.containers.created == []


def test_cli_other_exports_with_ilastik_and_rerun(cli, fake, project):
    args = ("--engine", "ilastik", "--ilastik", str(fake.path),
            "--uncertainty", "unc", "--segmentation", "seg")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert len(fake.calls()) == 3
    names = [f"img_{i}.tiff" for i in range(1, 6)]
    for folder in ("ilastik_probabilities", "unc", "seg"):
        assert sorted(p.name for p in (project / folder).iterdir()) == names
    assert result.stdout.splitlines()[:3] == [
        "ilastik_probabilities/img_1.tiff", "unc/img_1.tiff", "seg/img_1.tiff"
    ]

    # a missing export makes its image pending again, with every requested output
    (project / "seg" / "img_4.tiff").unlink()
    result = cli(*args)
    assert result.exit_code == 0, result.output
    rerun = fake.calls()[3:]
    assert len(rerun) == 3
    for call in rerun:
        assert [a for a in call["argv"] if not a.startswith("--")] == [
            f"{project.resolve() / 'ilastik_img' / 'img_4.h5'}/img"
        ]
    # without the option, the segmentation is not asked for: nothing is pending
    (project / "seg" / "img_4.tiff").unlink()
    result = cli("--engine", "ilastik", "--ilastik", str(fake.path), "--uncertainty", "unc")
    assert result.exit_code == 0 and len(fake.calls()) == 6


def test_cli_export_folder_must_differ_from_the_probabilities(cli, fake, project):
    result = cli("--engine", "ilastik", "--ilastik", str(fake.path),
                 "--segmentation", "ilastik_probabilities/")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "both the probabilities and the segmentation" in result.output
    assert fake.calls() == []
