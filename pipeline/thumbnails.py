"""Thumbnail sprites and their WebVTT track: what web players show above the seek bar.

A version with trick play has one thumbnail per I-frame (the first picture of each media
segment, :mod:`pipeline.trickplay`), laid out left to right and top to bottom in JPEG sheets of
``columns`` x ``rows`` tiles (``layout.thumbnail_sheet_name``). The track is a WebVTT file whose
cue ``i`` spans media segment ``i`` and whose text is the URI of its sheet with a media fragment
naming the tile (``sheet_000.jpg#xywh=160,0,160,90``), the form video.js, Vidstack, Shaka's and
JW Player's thumbnail plugins read.

The sheets are images a browser loads with an ``<img>`` or a CSS background, which cannot
decrypt anything: they are not encrypted. They sit beside the segments on the CDN under a
versioned path no one can guess, signed like segments when CDN signing is on; the track that
names them is served per viewer by the key server, under the token rules of the playlists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ffmpeg

from . import layout
from .sources import ffmpeg_command, work_input

if TYPE_CHECKING:
    from .services import Services

#: JPEG quality of the sheets (ffmpeg's mjpeg -q:v, 2 best to 31 worst): tiles are small and
#: looked at for a moment while seeking.
JPEG_QUALITY = 5


@dataclass(frozen=True)
class Thumbnails:
    """A version's thumbnail track: tile size, sheet layout, sheet file names, and the time
    span of each tile in seconds, in order (tile ``i`` covers ``cues[i]``)."""

    tile_width: int
    tile_height: int
    columns: int
    rows: int
    sheets: tuple[str, ...]
    cues: tuple[tuple[float, float], ...]

    def tile(self, index: int) -> tuple[str, int, int]:
        """Tile ``index``'s sheet and the top-left corner of its area in that sheet."""
        per_sheet = self.columns * self.rows
        sheet, place = divmod(index, per_sheet)
        row, column = divmod(place, self.columns)
        return self.sheets[sheet], column * self.tile_width, row * self.tile_height

    @property
    def sheet_size(self) -> tuple[int, int]:
        """Every sheet's size in pixels (the last one's unused tiles are black)."""
        return self.columns * self.tile_width, self.rows * self.tile_height

    def to_dict(self) -> dict[str, Any]:
        return {"tile_width": self.tile_width, "tile_height": self.tile_height,
                "columns": self.columns, "rows": self.rows, "sheets": list(self.sheets),
                "cues": [list(cue) for cue in self.cues]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thumbnails:
        return cls(
            tile_width=int(data["tile_width"]), tile_height=int(data["tile_height"]),
            columns=int(data["columns"]), rows=int(data["rows"]),
            sheets=tuple(str(name) for name in data["sheets"]),
            cues=tuple((float(start), float(end)) for start, end in data["cues"]),
        )


def plan_thumbnails(
    width: int, height: int, durations: Sequence[float]
) -> Thumbnails:
    """The layout of the thumbnails of ``len(durations)`` I-frames of a ``width`` x ``height``
    picture, one per media segment of those durations: tiles
    :data:`~pipeline.layout.THUMBNAIL_WIDTH` wide (never wider than the picture), the
    picture's shape, even sizes; sheets no larger than the tiles need."""
    count = len(durations)
    tile_width = _even(min(layout.THUMBNAIL_WIDTH, width))
    tile_height = _even(tile_width * height / width)
    columns = min(layout.THUMBNAIL_COLUMNS, count)
    rows = min(layout.THUMBNAIL_ROWS, -(-count // columns))
    per_sheet = columns * rows
    sheets = tuple(layout.thumbnail_sheet_name(i) for i in range(-(-count // per_sheet)))
    cues = []
    start = 0.0
    for duration in durations:
        cues.append((round(start, 3), round(start + duration, 3)))
        start += duration
    return Thumbnails(tile_width, tile_height, columns, rows, sheets, tuple(cues))


def _even(value: float) -> int:
    return max(2, round(value / 2) * 2)


def sprite_args(iframes: Path, demuxer: str, plan: Thumbnails, out_dir: Path) -> list[str]:
    """The ffmpeg command that decodes ``iframes`` (the I-frame rendition joined into one
    file, one picture per media segment) and tiles every picture, in order, into the sheets of
    ``plan`` in ``out_dir``. Only I-frames are decoded, so this is cheap."""
    name, options = work_input(str(iframes), demuxer=demuxer)
    video = ffmpeg.input(name, **options)["v:0"]
    tiled = video.filter("scale", plan.tile_width, plan.tile_height).filter(
        "tile", f"{plan.columns}x{plan.rows}"
    )
    output = ffmpeg.output(
        tiled, str(out_dir / "sheet_%03d.jpg"), start_number=0, fps_mode="passthrough",
        **{"q:v": JPEG_QUALITY}, format="image2",
    )
    return ffmpeg_command([output])


def render_vtt(thumbnails: Thumbnails, *, sheet_uri: Callable[[str], str]) -> str:
    """The WebVTT thumbnail track: cue ``i`` names tile ``i`` of its sheet (``sheet_uri`` of
    the sheet's name, then ``#xywh=x,y,w,h``)."""
    lines = ["WEBVTT", ""]
    for index, (start, end) in enumerate(thumbnails.cues):
        sheet, x, y = thumbnails.tile(index)
        lines += [
            f"{_timestamp(start)} --> {_timestamp(end)}",
            f"{sheet_uri(sheet)}#xywh={x},{y},{thumbnails.tile_width},{thumbnails.tile_height}",
            "",
        ]
    return "\n".join(lines)


def delete_thumbnails(svc: Services, asset: str, versions: Iterable[str]) -> int:
    """Delete the thumbnail sheets of ``versions`` of ``asset`` from the origin; returns how
    many objects went. Sheets are clear pictures: deleting the keys (crypto-shredding) leaves
    them readable, so a shred or a revocation deletes them, as it deletes downloads."""
    return sum(svc.origin.delete_prefix(layout.thumbnails_prefix(asset, version))
               for version in versions)


def _timestamp(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"
