"""steinbock panel files (``panel.csv``) and the channel groups of their ``ilastik`` column."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from steinpix.errors import SteinpixError, read_error

ILASTIK_COLUMN = "ilastik"


def read_panel(panel_file: str | os.PathLike, unfiltered: bool = False) -> pd.DataFrame:
    """Read a steinbock panel, exactly as steinbock does, with one-line errors.

    Columns are separated by ``,`` or ``;``; ``channel`` and ``name`` are required; ``channel``
    and ``keep`` must have no missing values; ``channel`` and ``name`` must be unique; ``keep``
    is ``1``/``0``. Rows with ``keep == 0`` are dropped unless ``unfiltered``.

    Parameters
    ----------
    panel_file : path
        The CSV file.
    unfiltered : bool
        Keep the rows whose ``keep`` is 0.

    Returns
    -------
    panel : pandas.DataFrame
        One row per (kept) image channel, in image channel order.

    Raises
    ------
    SteinpixError
        When the file cannot be read or breaks one of the rules above.
    """
    panel_file = Path(panel_file)
    try:
        panel = pd.read_csv(
            panel_file,
            sep=",|;",
            dtype={
                "channel": pd.StringDtype(),
                "name": pd.StringDtype(),
                "keep": pd.BooleanDtype(),
            },
            engine="python",
            true_values=["1"],
            false_values=["0"],
        )
    except FileNotFoundError:
        raise SteinpixError(f"{panel_file}: panel file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SteinpixError(f"{panel_file}: cannot read the panel ({e})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, TypeError) as e:
        # pandas' own errors for bad contents; the same types from steinpix's code are bugs
        raise read_error(panel_file, e, "not a readable panel", "pandas", "numpy") from e
    for required_col in ("channel", "name"):
        if required_col not in panel:
            raise SteinpixError(f"{panel_file}: missing '{required_col}' column")
    for notnan_col in ("channel", "keep"):
        if notnan_col in panel and panel[notnan_col].isna().any():
            raise SteinpixError(f"{panel_file}: missing values in the '{notnan_col}' column")
    for unique_col in ("channel", "name"):
        duplicated = panel[unique_col].dropna()
        duplicated = duplicated[duplicated.duplicated()]
        if len(duplicated) > 0:
            raise SteinpixError(
                f"{panel_file}: duplicated values in the '{unique_col}' column: "
                + ", ".join(sorted(set(duplicated.astype(str))))
            )
    if not unfiltered and "keep" in panel:
        panel = panel.loc[panel["keep"].astype(bool), :]
    return panel


def channel_groups(
    panel: pd.DataFrame, panel_file: str | os.PathLike = "panel"
) -> np.ndarray | None:
    """The ``ilastik`` column as float group values, or None when it is absent or empty.

    steinbock groups channels by this column only when it has at least one value; channels
    without a value (NaN) belong to no group and are dropped.

    Returns
    -------
    groups : (C,) float64 ndarray or None
        One group value per panel row (NaN: no group).
    """
    if ILASTIK_COLUMN not in panel or not panel[ILASTIK_COLUMN].notna().any():
        return None
    try:
        return pd.to_numeric(panel[ILASTIK_COLUMN]).to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError):
        raise SteinpixError(
            f"{panel_file}: the '{ILASTIK_COLUMN}' column must hold numbers (channel groups)"
        ) from None
