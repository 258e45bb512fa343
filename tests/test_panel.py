from pathlib import Path

import numpy as np
import pytest

from steinpix.errors import SteinpixError
from steinpix.panel import channel_groups, read_panel

from conftest import EXAMPLE


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "panel.csv"
    path.write_text(text)
    return path


def test_example_panel_groups():
    panel = read_panel(EXAMPLE / "panel.csv")
    assert list(panel["name"]) == ["Ag107", "Cytokeratin 5", "Laminin", "YBX1", "H3K27Ac"]
    groups = channel_groups(panel)
    np.testing.assert_array_equal(groups, [1, np.nan, np.nan, 2, 3])


def test_semicolons_and_keep_filter(tmp_path):
    path = write(tmp_path, "channel;name;keep;ilastik\nA;a;1;2\nB;b;0;1\nC;c;1;\n")
    panel = read_panel(path)
    assert list(panel["channel"]) == ["A", "C"]
    np.testing.assert_array_equal(channel_groups(panel), [2, np.nan])
    assert len(read_panel(path, unfiltered=True)) == 3


def test_no_or_empty_ilastik_column_means_no_groups(tmp_path):
    assert channel_groups(read_panel(write(tmp_path, "channel,name\nA,a\nB,b\n"))) is None
    assert channel_groups(read_panel(write(tmp_path, "channel,name,ilastik\nA,a,\nB,b,\n"))) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,keep\na,1\n", "missing 'channel' column"),
        ("channel,keep\nA,1\n", "missing 'name' column"),
        ("channel,name\nA,a\nA,b\n", "duplicated values in the 'channel' column: A"),
        ("channel,name\nA,a\nB,a\n", "duplicated values in the 'name' column: a"),
        ("channel,name,keep\nA,a,1\nB,b,\n", "missing values in the 'keep' column"),
        ("channel,name,ilastik\nA,a,x\n", "'ilastik' column must hold numbers"),
    ],
)
def test_bad_panels_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SteinpixError) as e:
        channel_groups(read_panel(path), path)
    assert str(e.value).startswith(str(path))
    assert message in str(e.value)
    assert "\n" not in str(e.value)
