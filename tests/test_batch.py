"""The core of a batch (steinpix.batch): pending images, the per-image tasks, the executor seam."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from steinpix import batch

from conftest import EXAMPLE, TEST_DATA

REF = TEST_DATA / "reference"


@pytest.fixture
def job(tmp_path: Path) -> batch.Job:
    shutil.copytree(REF / "ilastik_img", tmp_path / "ilastik_img")
    shutil.copy(EXAMPLE / "pretrained.ilp", tmp_path / "pixel_classifier.ilp")
    return batch.Job(ilp=tmp_path / "pixel_classifier.ilp", out_dir=tmp_path / "out")


def images(job: batch.Job) -> list[Path]:
    return sorted((job.ilp.parent / "ilastik_img").glob("*.h5"))


def test_run_batch_reports_each_finished_image_once(job):
    events = []
    batch.prepare_outputs(job)
    failed = batch.run_batch(job, images(job), on_result=lambda i, n, r: events.append((i, n, r)))
    assert failed == []
    assert [(i, n) for i, n, _ in events] == [(1, 3), (2, 3), (3, 3)]
    assert [r.img_file for *_, r in events] == images(job)
    for *_, result in events:
        (out,) = result.outputs
        assert result.ok
        np.testing.assert_array_equal(
            tifffile.imread(out), tifffile.imread(REF / "ilastik_probabilities" / out.name)
        )


def test_failed_image_is_a_result_not_an_exception(job):
    bad = images(job)[1]
    bad.write_bytes(b"not HDF5")
    batch.prepare_outputs(job)
    failed = batch.run_batch(job, images(job))
    assert [r.img_file for r in failed] == [bad]
    assert str(bad) in failed[0].error and "\n" not in failed[0].error
    assert sorted(p.name for p in job.out_dir.iterdir()) == [
        f.with_suffix(".tiff").name for f in images(job) if f != bad
    ]
    assert "1 of 3 images failed" in str(batch.failure_error(failed, 3))


def test_an_image_written_while_the_next_computes_keeps_its_result_and_order(job):
    # run_local writes an image's last rows while it computes the next one: a failure to
    # put the first image's file in place (its output path is a folder) is that image's
    # error, reported before the next image's result, and leaves no temporary file
    first, second, third = images(job)
    batch.prepare_outputs(job)
    blocker = job.out_dir / first.with_suffix(".tiff").name
    blocker.mkdir()
    third.write_bytes(b"not HDF5")
    events = []
    failed = batch.run_batch(job, [first, second, third],
                             on_result=lambda i, n, r: events.append(r))
    assert [r.img_file for r in events] == [first, second, third]
    assert [r.ok for r in events] == [False, True, False]
    assert str(first) in events[0].error and "\n" not in events[0].error
    assert [r.img_file for r in failed] == [first, third]
    assert sorted(p.name for p in job.out_dir.iterdir()) == sorted(
        [blocker.name, second.with_suffix(".tiff").name])
    assert list(blocker.iterdir()) == []
    np.testing.assert_array_equal(
        tifffile.imread(job.out_dir / second.with_suffix(".tiff").name),
        tifffile.imread(REF / "ilastik_probabilities" / second.with_suffix(".tiff").name),
    )


def test_stopping_a_batch_removes_the_file_still_being_written(job):
    # the consumer stops after the first result: the second image is computed then, its file
    # still being written, and must not appear
    batch.prepare_outputs(job)
    results = batch.run_local(job, batch.make_tasks(job, images(job)))
    (first,) = next(results)
    assert first.ok and first.outputs[0].exists()
    results.close()
    assert sorted(p.name for p in job.out_dir.iterdir()) == [first.outputs[0].name]


@dataclass(frozen=True)
class TwoOutputs(batch.Job):
    """A batch that writes a second file per image (as --uncertainty will)."""

    def outputs(self, img_file):
        return (*super().outputs(img_file), self.out_dir / f"{Path(img_file).stem}_extra.tiff")


def test_pending_until_every_output_is_finished(job):
    job = TwoOutputs(ilp=job.ilp, out_dir=job.out_dir)
    files = images(job)
    job.out_dir.mkdir()
    for out in job.outputs(files[0]) + job.outputs(files[1])[:1]:
        out.write_bytes(b"done")
    assert batch.pending_images(job, files) == files[1:]
    assert batch.pending_images(job, files, overwrite=True) == files


def test_project_loaded_once_per_process_until_it_changes(job):
    first = batch.load_model(job.ilp)
    assert batch.load_model(job.ilp) is first
    st = job.ilp.stat()
    os.utime(job.ilp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert batch.load_model(job.ilp) is not first


def test_tasks_per_engine(job):
    files = images(job)
    assert [t.files for t in batch.make_tasks(job, files)] == [(f,) for f in files]
    chunked = batch.Job(ilp=job.ilp, out_dir=job.out_dir, engine="ilastik", chunk=2)
    tasks = batch.make_tasks(chunked, files)
    assert [t.files for t in tasks] == [tuple(files[:2]), tuple(files[2:])]
    assert [t.label for t in tasks] == ["chunk 1/2", "chunk 2/2"]
