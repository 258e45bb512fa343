"""The preview's pages and table: ``index.html``, ``crops.html`` and ``summary.csv``.

The pages are self-contained (inline CSS, no JavaScript, no network) and link the thumbnails
by relative paths, so the output folder can be copied or zipped and opened anywhere.
"""

from __future__ import annotations

import csv
import html
import io
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steinpix.atomic import atomic_output
from steinpix.preview import Classes, CropRecord, ImageRecord

# displayed thumbnail size (CSS pixels, long side); the PNG links open the full thumbnail
DISPLAY_SIZE = 280

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px 32px; color: #1f2328; background: #fff; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 0 0 6px; }
a { color: #0550ae; text-decoration: none; }
a:hover { text-decoration: underline; }
.meta { color: #59636e; margin: 0 0 14px; }
.legend { margin: 0 0 18px; }
.legend span { margin-right: 18px; white-space: nowrap; }
.sw { display: inline-block; width: 13px; height: 13px; border-radius: 2px;
      vertical-align: -2px; margin-right: 5px; box-shadow: inset 0 0 0 1px rgba(0,0,0,.2); }
table { border-collapse: collapse; margin: 0 0 24px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #d8dee4; text-align: left;
         vertical-align: middle; }
th { font-weight: 600; background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.flagged td { background: #fff5f5; }
tr.total td { font-weight: 600; border-top: 2px solid #aab4be; }
.bar { display: flex; width: 150px; height: 12px; border-radius: 2px; overflow: hidden;
       box-shadow: inset 0 0 0 1px rgba(0,0,0,.15); }
.flag { color: #b3261e; font-weight: 600; }
.ok { color: #1a7f37; }
.errors { color: #b3261e; }
section.image { border-top: 1px solid #d8dee4; padding: 14px 0 10px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 14px; margin-top: 8px; }
figure { margin: 0; max-width: 280px; }
figcaption { color: #59636e; font-size: 12px; margin-top: 3px; }
img { display: block; background: #eaeef2; }
img.up { image-rendering: pixelated; }
.crops { display: flex; flex-wrap: wrap; gap: 16px; }
.crops figure { width: 200px; }
.crops figcaption { word-break: break-all; }
"""


def write_text_if_changed(path: str | os.PathLike, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it.

    Returns
    -------
    bool
        True when the file was written.
    """
    path = Path(path)
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return True


def csv_header(names: Sequence[str]) -> list[str]:
    """``image, width, height, fraction_<class>..., mean_max_probability, flags``."""
    return [
        "image",
        "width",
        "height",
        *(f"fraction_{name}" for name in names),
        "mean_max_probability",
        "flags",
    ]


def render_summary_csv(
    records: Sequence[ImageRecord], names: Sequence[str], flags: Mapping[str, Sequence[str]]
) -> str:
    """``summary.csv``: one row per image, in name order; fractions with 6 decimals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_header(names))
    for r in records:
        writer.writerow(
            [
                r.name,
                r.width,
                r.height,
                *(f"{f:.6f}" for f in r.fractions),
                f"{r.mean_max_probability:.6f}",
                "; ".join(flags.get(r.name, ())),
            ]
        )
    return out.getvalue()


def read_summary_csv(path: str | os.PathLike, names: Sequence[str]) -> dict[str, ImageRecord]:
    """The records of a previous run's ``summary.csv`` (empty when it is missing, unreadable
    or was written for other classes), so that a rerun keeps what is up to date."""
    header = csv_header(names)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not rows or rows[0] != header:
        return {}
    records = {}
    n = len(names)
    for row in rows[1:]:
        if len(row) != len(header):
            return {}
        try:
            records[row[0]] = ImageRecord(
                name=row[0],
                width=int(row[1]),
                height=int(row[2]),
                fractions=tuple(float(v) for v in row[3 : 3 + n]),
                mean_max_probability=float(row[3 + n]),
            )
        except ValueError:
            return {}
    return records


def _rgb(color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in color[:3]))


def _legend(classes: Classes) -> str:
    items = "".join(
        f'<span><i class="sw" style="background:{_rgb(c)}"></i>{html.escape(n)}</span>'
        for n, c in zip(classes.names, classes.colors, strict=True)
    )
    note = (
        " <em>(the project stores no usable PmapColors: ilastik's default colours)</em>"
        if classes.default_colors
        else ""
    )
    return f'<p class="legend">{items}{note}</p>'


def _bar(fractions: Sequence[float], classes: Classes) -> str:
    parts = "".join(
        f'<i style="width:{100 * f:.2f}%;background:{_rgb(c)}"></i>'
        for f, c in zip(fractions, classes.colors, strict=True)
        if f > 0
    )
    return f'<div class="bar" title="pixels per most probable class">{parts}</div>'


def _img(src: str, shape: tuple[int, int], alt: str, box: int = DISPLAY_SIZE) -> str:
    """An ``<img>`` scaled to ``box`` CSS pixels on its long side, linking the PNG; small
    thumbnails are enlarged with visible pixels rather than blurred."""
    height, width = shape
    scale = box / max(height, width, 1)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    up = ' class="up"' if scale > 1 else ""
    # a relative URL: file names may hold characters with a meaning in URLs (#, %, ?, spaces)
    src = html.escape(urllib.parse.quote(src), quote=True)
    return (
        f'<a href="{src}"><img src="{src}" width="{w}" height="{h}"{up} '
        f'alt="{html.escape(alt, quote=True)}"></a>'
    )


def batch_totals(records: Sequence[ImageRecord]) -> tuple[tuple[float, ...], float, int]:
    """Pixel-weighted class fractions and mean maximum probability over all images.

    Returns
    -------
    fractions : tuple of float
    mean_max_probability : float
    pixels : int
    """
    if not records:
        return (), float("nan"), 0
    pixels = np.array([r.height * r.width for r in records], dtype=np.float64)
    total = pixels.sum()
    fractions = np.array([r.fractions for r in records]).T @ pixels / max(total, 1)
    mean_max = float(np.array([r.mean_max_probability for r in records]) @ pixels / max(total, 1))
    return tuple(float(f) for f in fractions), mean_max, int(total)


@dataclass(frozen=True)
class PageInfo:
    """What the page says about where its data came from."""

    probabilities: str
    images: str
    project: str
    uncertainty: str | None = None
    crops_page: str | None = None


def render_index(
    records: Sequence[ImageRecord],
    classes: Classes,
    flags: Mapping[str, Sequence[str]],
    thumbnails: Callable[[str], Sequence[tuple[str, str, tuple[int, int]]]],
    errors: Sequence[str],
    info: PageInfo,
) -> str:
    """``index.html``: legend, summary table (flagged images first), a row per image.

    Parameters
    ----------
    records : ImageRecord per previewed image, in name order
    classes : Classes
    flags : image name -> flag texts
    thumbnails : callable
        ``thumbnails(name)`` gives ``(relative src, caption, (height, width))`` per thumbnail.
    errors : one-line messages of the files that could not be previewed
    info : PageInfo
    """
    names = classes.names
    esc = html.escape
    n_flagged = sum(1 for r in records if flags.get(r.name))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ilastik preview: {len(records)} images</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>ilastik probabilities</h1>",
        '<p class="meta">'
        + f"{len(records)} images from <code>{esc(info.probabilities)}</code> "
        + f"(images <code>{esc(info.images)}</code>, project <code>{esc(info.project)}</code>"
        + (f", uncertainty <code>{esc(info.uncertainty)}</code>" if info.uncertainty else "")
        + "). "
        + (
            f'<span class="flag">{n_flagged} flagged</span>'
            if n_flagged
            else '<span class="ok">none flagged</span>'
        )
        + (f', <span class="flag">{len(errors)} not previewed</span>' if errors else "")
        + "."
        + (f' <a href="{esc(info.crops_page)}">Training crops</a>' if info.crops_page else "")
        + "</p>",
        _legend(classes),
    ]
    if errors:
        out.append(f'<h2>Not previewed ({len(errors)})</h2><ul class="errors">')
        out += [f"<li>{esc(e)}</li>" for e in errors]
        out.append("</ul>")
    class_heads = "".join(f'<th class="num">{esc(n)}</th>' for n in names)
    out += [
        '<table><thead><tr><th>image</th><th class="num">size</th><th>most probable class</th>',
        f'{class_heads}<th class="num">mean max<br>probability</th><th>flags</th></tr></thead>',
        "<tbody>",
    ]
    ordered = sorted(records, key=lambda r: (not flags.get(r.name), r.name))
    for r in ordered:
        f = flags.get(r.name, ())
        out.append(
            f'<tr{" class=flagged" if f else ""}><td><a href="#{esc(r.name, quote=True)}">'
            f"{esc(r.name)}</a></td><td class=num>{r.width} × {r.height}</td>"
            f"<td>{_bar(r.fractions, classes)}</td>"
            + "".join(f"<td class=num>{v:.1%}</td>" for v in r.fractions)
            + f"<td class=num>{r.mean_max_probability:.2f}</td>"
            + f'<td class="flag">{esc("; ".join(f))}</td></tr>'
        )
    fractions, mean_max, pixels = batch_totals(records)
    if records:
        out.append(
            f"<tr class=total><td>all {len(records)} images</td>"
            f"<td class=num>{pixels / 1e6:.2f} Mpx</td><td>{_bar(fractions, classes)}</td>"
            + "".join(f"<td class=num>{v:.1%}</td>" for v in fractions)
            + f"<td class=num>{mean_max:.2f}</td><td></td></tr>"
        )
    out.append("</tbody></table>")
    for r in records:
        f = flags.get(r.name, ())
        legend = ", ".join(f"{esc(n)} {v:.1%}" for n, v in zip(names, r.fractions, strict=True))
        out.append(
            f'<section class="image" id="{esc(r.name, quote=True)}">'
            f"<h2>{esc(r.name)}</h2>"
            f'<div class="meta">{r.width} × {r.height} px · {legend} · mean max probability '
            f"{r.mean_max_probability:.2f}"
            + (f' · <span class="flag">{esc("; ".join(f))}</span>' if f else "")
            + '</div><div class="thumbs">'
        )
        for src, caption, shape in thumbnails(r.name):
            out.append(
                f"<figure>{_img(src, shape, f'{r.name}: {caption}')}"
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
        out.append("</div></section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def render_crops(
    crops: Sequence[CropRecord],
    thumbnails: Mapping[str, tuple[str, tuple[int, int]]],
    errors: Sequence[str],
    crop_dir: str,
) -> str:
    """``crops.html``: a contact sheet of the training crops' first channels.

    Parameters
    ----------
    crops : CropRecord per crop, in name order
    thumbnails : crop name -> (relative src, (height, width))
    errors : one-line messages of crops that could not be read
    crop_dir : the crops folder, for the heading
    """
    esc = html.escape
    flagged = [c for c in crops if c.flags]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ilastik crops: {len(crops)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>ilastik training crops</h1>",
        f'<p class="meta">{len(crops)} crops in <code>{esc(crop_dir)}</code>, first channel '
        "(steinbock's mean channel), contrast stretched from its 1st to 99.5th percentile. "
        + (
            f'<span class="flag">{len(flagged)} flagged</span>'
            if flagged
            else '<span class="ok">none flagged</span>'
        )
        + (f', <span class="flag">{len(errors)} unreadable</span>' if errors else "")
        + ".</p>",
    ]
    if errors:
        out.append(f'<h2>Unreadable ({len(errors)})</h2><ul class="errors">')
        out += [f"<li>{esc(e)}</li>" for e in errors]
        out.append("</ul>")
    out.append('<div class="crops">')
    for c in sorted(crops, key=lambda c: (not c.flags, c.name)):
        src, shape = thumbnails[c.name]
        out.append(
            f"<figure>{_img(src, shape, c.name, box=200)}<figcaption>{esc(c.name)}<br>"
            f"{c.width} × {c.height} px · stretch {c.limits[0]:.4g}–{c.limits[1]:.4g}"
            + (f'<br><span class="flag">{esc("; ".join(c.flags))}</span>' if c.flags else "")
            + "</figcaption></figure>"
        )
    out.append("</div></body></html>\n")
    return "\n".join(out)
