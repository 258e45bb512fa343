"""numba's cache of a kernel that calls compiled code of another module: an edit of that module
alone must not leave the old machine code in use (steinpix.kernel_cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steinpix import features, forest, fused

KERNEL = """
import numba
from helper import value
{stamp}

@numba.njit(cache=True)
def kernel():
    return value()

{apply}
print(kernel())
"""


def run_kernel(folder: Path, stamped: bool) -> str:
    src = Path(__file__).resolve().parents[1] / "src"
    kern = folder / "kern.py"
    if not kern.exists():  # written once: numba looks at this file's stamp
        kern.write_text(KERNEL.format(
            stamp="from steinpix.kernel_cache import depend_on_sources" if stamped else "",
            apply="depend_on_sources(kernel, 'helper.py')" if stamped else "",
        ))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(folder / "cache"),
               PYTHONPATH=os.pathsep.join([str(folder), str(src)]))
    done = subprocess.run([sys.executable, "kern.py"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def edit_helper(folder: Path, value: int) -> None:
    helper = folder / "helper.py"
    helper.write_text(textwrap.dedent(f"""
        import numba

        @numba.njit
        def value():
            return {value}
    """))
    st = helper.stat()  # a later modification time, whatever the file system's resolution
    os.utime(helper, ns=(st.st_atime_ns, st.st_mtime_ns + (value + 1) * 10**9))


@pytest.mark.parametrize("stamped", [False, True])
def test_an_edit_of_a_called_module_recompiles_the_cached_kernel(tmp_path, stamped):
    edit_helper(tmp_path, 1)
    assert run_kernel(tmp_path, stamped) == "1"
    edit_helper(tmp_path, 2)
    # numba alone reuses its stale machine code; with the sources as part of the stamp the
    # kernel is compiled again
    assert run_kernel(tmp_path, stamped) == ("2" if stamped else "1")
    assert run_kernel(tmp_path, stamped) == ("2" if stamped else "1")


def test_the_fused_kernel_depends_on_the_feature_and_forest_sources():
    stamp = fused._classify_rows._cache._cache_file._source_stamp
    for module in (features, forest):
        st = os.stat(module.__file__)
        assert (st.st_mtime, st.st_size) in stamp
