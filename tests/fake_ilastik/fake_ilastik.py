# A stand-in for ilastik 1.3.3post3's headless launcher, for tests. The test helpers install it as
# an executable with a "#!<python>" line (see __init__.py); it uses the standard library only.
#
# It appends one JSON line per call to calls.jsonl (argv, environment, process ids) and exports
# the way ilastik names its outputs: <output_filename_format> with {nickname} replaced by
# "<h5 stem>-<internal path>", by copying the bytes of config["tiffs"][<--export_source>]
# (config["tiff"] for Probabilities; relative to the fake's folder). Like ilastik's pixel
# classification it knows only the export sources of EXPORT_SOURCES (others: exit 2). Behaviours
# come from fake_ilastik.json in the fake's folder: the folder of this file, or
# $FAKE_ILASTIK_DIR (a test image's launcher points it into the mounted data folder):
#   fail_on: [stem, ...]     exit config["fail_code"] (1) when reaching that image, after
#                            writing the outputs of the images before it (like a crash)
#   slow_on: [stem, ...]     write half an output, touch started-<pid>, then sleep until killed;
#                            on SIGINT touch interrupted-<pid> and exit 130
#   ignore_signals: bool     ignore SIGINT and SIGTERM (only SIGKILL stops it)
#   no_output: [stem, ...]   exit 0 without writing that image's output
#   exit_code: int           exit code at the end (default 0)
#   fail_on_source: [source, ...]  exit config["fail_code"] (1) at once when asked for that export
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

HERE = Path(os.environ.get("FAKE_ILASTIK_DIR") or Path(__file__).resolve().parent)
# ilastik 1.3.3post3's pixel-classification export sources (PixelClassificationWorkflow)
EXPORT_SOURCES = ("Probabilities", "Simple Segmentation", "Uncertainty", "Features", "Labels")


def mount_points() -> list[str]:
    """Where something is mounted (Linux; tests of containers check what they see)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[4] for line in lines]


def record() -> None:
    entry = {
        "argv": sys.argv[1:],
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "hostname": socket.gethostname(),
        "mounts": mount_points(),
    }
    with open(HERE / "calls.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def parse(argv: list[str]) -> tuple[str | None, str, list[str]]:
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    inputs = [a for a in argv if not a.startswith("--")]
    source = options.get("export_source", "Probabilities")
    return options.get("output_filename_format"), source, inputs


def nickname(dataset_path: str) -> tuple[Path, str]:
    h5_file, internal = dataset_path.split(".h5/", 1)
    h5_path = Path(h5_file + ".h5")
    return h5_path, f"{h5_path.stem}-{internal.strip('/').replace('/', '-')}"


def wait_for_signal(output: Path) -> None:
    (HERE / f"started-{os.getpid()}").touch()
    try:
        for _ in range(600):
            time.sleep(0.1)
    except KeyboardInterrupt:
        (HERE / f"interrupted-{os.getpid()}").touch()
        sys.exit(130)
    sys.exit(3)  # nobody stopped us: the test fails on the exit code


def main() -> int:
    record()
    config = json.loads((HERE / "fake_ilastik.json").read_text(encoding="utf-8"))
    if config.get("ignore_signals"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--headless" not in sys.argv[1:]:
        print("fake ilastik: GUI", sys.argv[1:])
        return int(config.get("exit_code", 0))
    output_format, source, inputs = parse(sys.argv[1:])
    if output_format is None:  # like ilastik: nothing to export, start and quit
        return int(config.get("exit_code", 0))
    if source not in EXPORT_SOURCES:
        print(f"fake ilastik: unknown export source {source!r}", file=sys.stderr)
        return 2
    if source in config.get("fail_on_source", []):
        print(f"fake ilastik: failing on the {source} export", file=sys.stderr)
        return int(config.get("fail_code", 1))
    tiff = (HERE / config.get("tiffs", {}).get(source, config["tiff"])).read_bytes()
    for dataset_path in inputs:
        h5_path, name = nickname(dataset_path)
        if not h5_path.is_file():
            print(f"fake ilastik: no such file {h5_path}", file=sys.stderr)
            return 1
        output = Path(output_format.replace("{nickname}", name))
        if h5_path.stem in config.get("fail_on", []):
            print(f"fake ilastik: failing on {h5_path.name}", file=sys.stderr)
            return int(config.get("fail_code", 1))
        if h5_path.stem in config.get("slow_on", []):
            output.write_bytes(tiff[: len(tiff) // 2])
            wait_for_signal(output)
        if h5_path.stem in config.get("no_output", []):
            continue
        output.write_bytes(tiff)
        print(f"fake ilastik: exported {output.name}", flush=True)
    return int(config.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
