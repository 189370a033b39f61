"""The load sweep's figure: an SVG drawn with the standard library alone.

    python -m bench.plot SWEEP.json [MORE.json ...] [-o docs/bench/load.svg] [--labels a,b]

Reads what `python -m bench.sweep --json-out SWEEP.json` wrote (one file per
run: the code before a change, after it, ...) and draws two panels side by
side, offered load (msg/s in all) across, on log scales:

- delivered msg/s, with the line where delivered = offered;
- relay CPU per delivered message (us);

each with the server and the bare loop of every file, and the flat-out
point in a column of its own at the right (it has no offered load). A file
is told apart by its line (the last one solid, earlier ones dashed, with
hollow markers), a relay by its colour and marker. A file of several runs
(`--runs N`) has its medians drawn, with a bar from the lowest to the
highest run at each point. Each marker carries a `<title>` with its
figures (a browser shows it on hover). Nothing is run:
a figure can be redrawn, or compared with a later run, from the files alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

if __package__ in (None, ""):  # `python bench/plot.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ROOT
from bench.sweep import FORMAT, VERSION

DEFAULT_OUT = ROOT / "docs" / "bench" / "load.svg"
WIDTH = 900
#: Each panel's plot area (left, top, right, bottom): README width is about
#: 830 px on GitHub, so the figure shrinks a little and 12 px text stays legible.
PANELS = ((80, 70, 420, 330), (530, 70, 870, 330))
#: Of a panel's width, the offered loads' log scale takes this share; the
#: flat-out column sits in the rest, past a dashed separator.
LOG_SHARE = 0.78
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
KINDS = (("server", "server", "#c0392b", "circle"), ("bare", "bare loop", "#1f6f8b", "square"))
DASH = "6 4"
INK, GRID, FAINT = "#222222", "#e3e3e3", "#888888"


class PlotError(Exception):
    """A file the plot cannot use; the message says which and why."""


@dataclass
class Point:
    offered: float | None  # msg/s in all; None: flat out
    msgs_per_s: float
    cpu_us_per_msg: float
    lost: int
    #: Over several runs (`python -m bench.sweep --runs N`): the lowest and
    #: highest msgs_per_s and cpu_us_per_msg of the runs, by panel key.
    spread: dict[str, tuple[float, float]] | None = None


@dataclass
class Run:
    label: str
    path: Path
    meta: dict[str, Any]
    points: dict[str, list[Point]]  # by kind: "server", "bare"


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlotError(f"{where} is {value!r}, not a number")
    return float(value)


def load_run(path: Path, label: str | None = None) -> Run:
    """One sweep's JSON, checked: a PlotError says what is wrong with it."""
    hint = f"{path}: not a load sweep's JSON"
    fix = "write one with python -m bench.sweep --json-out FILE"
    try:
        document = json.loads(path.read_text("utf-8"))
    except OSError as e:
        raise PlotError(f"{path}: cannot read it ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError:
        raise PlotError(f"{hint} (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as e:
        raise PlotError(f"{hint} (bad JSON at line {e.lineno}: {e.msg}); {fix}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise PlotError(f'{hint} (no "format": {FORMAT!r}); {fix}')
    if document.get("version") != VERSION:
        raise PlotError(f"{path}: sweep format version {document.get('version')!r}; this plot "
                        f"reads version {VERSION}: rerun python -m bench.sweep")  # fmt: skip
    meta, raw = document.get("meta"), document.get("points")
    if not isinstance(meta, dict) or not isinstance(raw, list) or not raw:
        raise PlotError(f'{hint} (it needs "meta" and a non-empty "points" list); {fix}')
    try:
        points = _points(path, raw)
        each = document.get("runs")
        if each is not None:
            _spread(path, points, each)
    except PlotError as e:
        raise PlotError(f"{e}; {fix}") from None
    name = label or str(meta.get("label") or path.stem)
    return Run(name, path, meta, points)


def _spread(path: Path, points: dict[str, list[Point]], each: Any) -> None:
    """Each point's lowest and highest figures over the runs it is the
    median of (the document's "runs": one list of points per run)."""
    if not isinstance(each, list) or not each or not all(isinstance(r, list) for r in each):
        raise PlotError(f'{path}: "runs" is not a list of runs\' points')
    runs = [_points(path, r, f"runs[{j}].points") for j, r in enumerate(each)]
    for kind, series in points.items():
        for j, run in enumerate(runs):
            if [p.offered for p in run[kind]] != [p.offered for p in series]:
                raise PlotError(f'{path}: runs[{j}] has other loads than "points"')
        for i, point in enumerate(series):
            rates = [run[kind][i].msgs_per_s for run in runs]
            cpus = [run[kind][i].cpu_us_per_msg for run in runs]
            point.spread = {"rate": (min(rates), max(rates)), "cpu": (min(cpus), max(cpus))}


def _points(path: Path, raw: list[Any], name: str = "points") -> dict[str, list[Point]]:
    """A sweep's points by relay, each figure checked."""
    points: dict[str, list[Point]] = {kind: [] for kind, *_ in KINDS}
    for i, item in enumerate(raw):
        where = f"{path}: {name}[{i}]"
        if not isinstance(item, dict):
            raise PlotError(f"{where} is not an object")
        offered = item.get("offered")
        if offered is not None and _number(offered, f"{where}.offered") <= 0:
            raise PlotError(f"{where}.offered is {offered!r}: an offered load is above 0 msg/s")
        for kind, *_ in KINDS:
            figures = item.get(kind)
            if not isinstance(figures, dict):
                raise PlotError(f"{where} has no {kind!r} figures")
            points[kind].append(Point(
                None if offered is None else float(offered),
                _number(figures.get("msgs_per_s"), f"{where}.{kind}.msgs_per_s"),
                _number(figures.get("cpu_us_per_msg"), f"{where}.{kind}.cpu_us_per_msg"),
                int(_number(figures.get("lost", 0), f"{where}.{kind}.lost")),
            ))  # fmt: skip
    return points


# --- scales and ticks ---------------------------------------------------------------


@dataclass
class LogScale:
    """Values lo..hi (both > 0) onto pixels p0..p1, logarithmically."""

    lo: float
    hi: float
    p0: float
    p1: float

    def __call__(self, value: float) -> float:
        share = (math.log10(value) - math.log10(self.lo)) / (
            math.log10(self.hi) - math.log10(self.lo)
        )
        return self.p0 + share * (self.p1 - self.p0)


def decade_range(values: Sequence[float]) -> tuple[float, float]:
    """The whole decades around the positive `values` (at least one decade)."""
    positive = [v for v in values if v > 0] or [1.0]
    lo = 10 ** math.floor(math.log10(min(positive)))
    hi = 10 ** math.ceil(math.log10(max(positive)))
    return lo, hi if hi > lo else lo * 10


def ticks(lo: float, hi: float) -> list[tuple[float, bool]]:
    """(value, labelled) ticks of a log axis: 1, 2 and 5 of each decade,
    labelled all while the axis spans at most 3 decades, else decades only."""
    decades = round(math.log10(hi / lo))
    out = []
    for d in range(decades + 1):
        base = lo * 10**d
        for m in (1, 2, 5):
            value = base * m
            if value <= hi * 1.0001:
                out.append((value, m == 1 or decades <= 3))
    return out


def short(value: float) -> str:
    """A tick's label: 150, 2k, 10k, 1.5M, 0.5."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


# --- drawing -----------------------------------------------------------------------


class Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def text(self, x: float, y: float, content: str, size: int = 12, anchor: str = "middle",
             extra: str = "") -> None:  # fmt: skip
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
                 f'{extra}>{escape(content)}</text>')  # fmt: skip

    def line(self, x0: float, y0: float, x1: float, y1: float, stroke: str,
             extra: str = "") -> None:  # fmt: skip
        self.add(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                 f'stroke="{stroke}"{extra}/>')  # fmt: skip

    def marker(self, shape: str, x: float, y: float, colour: str, hollow: bool,
               extra: str = "", title: str = "") -> None:  # fmt: skip
        fill = "#ffffff" if hollow else colour
        paint = f'fill="{fill}" stroke="{colour}" stroke-width="1.6"'
        if shape == "circle":
            element = f'<circle cx="{x:.2f}" cy="{y:.2f}" r="4" {paint}{extra}/>'
        else:
            element = (f'<rect x="{x - 3.5:.2f}" y="{y - 3.5:.2f}" width="7" height="7" '
                       f'{paint}{extra}/>')  # fmt: skip
        # The tooltip is the first child of a group around the shape, not the
        # shape's child: ImageMagick's SVG reader then skips the whole shape.
        self.add(f"<g><title>{escape(title)}</title>{element}</g>" if title else element)


@dataclass
class Panel:
    key: str  # "rate" or "cpu": which figure of a Point
    title: str
    y_label: str
    box: tuple[int, int, int, int]
    x: LogScale
    y: LogScale
    flat_x: float  # the flat-out column

    def px(self, point: Point) -> float:
        return self.flat_x if point.offered is None else self.x(point.offered)

    def value(self, point: Point) -> float:
        return point.msgs_per_s if self.key == "rate" else point.cpu_us_per_msg


def make_panels(runs: Sequence[Run]) -> list[Panel]:
    every = [p for run in runs for series in run.points.values() for p in series]
    offered = [p.offered for p in every if p.offered is not None]
    x_lo, x_hi = decade_range(offered or [100.0, 1000.0])
    spreads = [p.spread for p in every if p.spread]  # the runs' bars fit too
    rates = [p.msgs_per_s for p in every] + [v for s in spreads for v in s["rate"]]
    cpus = [p.cpu_us_per_msg for p in every] + [v for s in spreads for v in s["cpu"]]
    rate_lo, rate_hi = decade_range([*offered, *rates])
    cpu_lo, cpu_hi = decade_range(cpus)
    panels = []
    for (key, title, y_label, lo, hi), box in zip(
        (("rate", "Delivered msg/s", "delivered msg/s", rate_lo, rate_hi),
         ("cpu", "Relay CPU per message", "CPU \u00b5s per delivered message", cpu_lo, cpu_hi)),
        PANELS, strict=True,
    ):  # fmt: skip
        left, top, right, bottom = box
        split_x = left + LOG_SHARE * (right - left)
        panels.append(Panel(
            key, title, y_label, box, LogScale(x_lo, x_hi, left + 8, split_x - 14),
            LogScale(lo, hi, bottom, top), (split_x + right) / 2,
        ))  # fmt: skip
    return panels


def draw_axes(svg: Svg, panel: Panel, x_title: str) -> None:
    left, top, right, bottom = panel.box
    split_x = left + LOG_SHARE * (right - left)
    svg.text((left + right) / 2, top - 12, panel.title, 14, extra=' font-weight="bold"')
    for value, labelled in ticks(panel.y.lo, panel.y.hi):
        y = panel.y(value)
        svg.add(f'<g class="tick y" data-value="{value:g}">')
        svg.line(left, y, right, y, GRID)
        svg.line(left - 5, y, left, y, INK)
        if labelled:
            svg.text(left - 8, y + 4, short(value), anchor="end")
        svg.add("</g>")
    for value, labelled in ticks(panel.x.lo, panel.x.hi):
        x = panel.x(value)
        svg.add(f'<g class="tick x" data-value="{value:g}">')
        svg.line(x, top, x, bottom, GRID)
        svg.line(x, bottom, x, bottom + 5, INK)
        if labelled:
            svg.text(x, bottom + 18, short(value))
        svg.add("</g>")
    svg.add('<g class="tick x flat" data-value="flat out">')
    svg.line(panel.flat_x, bottom, panel.flat_x, bottom + 5, INK)
    svg.text(panel.flat_x, bottom + 18, "flat out")
    svg.add("</g>")
    svg.line(split_x, top, split_x, bottom, FAINT, f' stroke-dasharray="{DASH}"')
    svg.add(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
            f'fill="none" stroke="{INK}"/>')  # fmt: skip
    svg.text((left + split_x) / 2, bottom + 40, x_title, extra=' class="axis-label x"')
    mid = (top + bottom) / 2
    svg.text(
        left - 52,
        mid,
        panel.y_label,
        extra=f' class="axis-label y" transform="rotate(-90 {left - 52} {mid})"',
    )
    if panel.key == "rate":  # where a relay that keeps up sits
        lo = max(panel.x.lo, panel.y.lo)
        hi = min(panel.x.hi, panel.y.hi)
        if hi > lo:
            svg.line(panel.x(lo), panel.y(lo), panel.x(hi), panel.y(hi), FAINT,
                     ' stroke-dasharray="2 3" class="reference"')  # fmt: skip
            svg.text(panel.x(hi) - 6, panel.y(hi) - 6, "delivered = offered", 11, "end",
                     f' fill="{FAINT}"')  # fmt: skip


def draw_series(svg: Svg, panel: Panel, run: Run, kind: str, name: str, colour: str,
                shape: str, hollow: bool, dashed: bool) -> None:  # fmt: skip
    points = [p for p in run.points[kind] if panel.value(p) > 0]  # a log scale has no 0
    unit = "msg/s" if panel.key == "rate" else "\u00b5s/msg"
    label = f"{name}, {run.label}"
    svg.add(f"<g class=\"series\" data-kind={quoteattr(kind)} data-label={quoteattr(run.label)}>"
            f"<title>{escape(label)}</title>")  # fmt: skip
    paced = sorted((p for p in points if p.offered is not None), key=lambda p: p.offered or 0)
    if len(paced) > 1:
        coords = " ".join(f"{panel.px(p):.2f},{panel.y(panel.value(p)):.2f}"
                          for p in paced)  # fmt: skip
        dash = f' stroke-dasharray="{DASH}"' if dashed else ""
        svg.add(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"'
                f"{dash}/>")  # fmt: skip
    for p in points:  # each run's spread under the marker
        low, high = p.spread[panel.key] if p.spread else (0.0, 0.0)
        if low > 0 and high > low:
            x, y0, y1 = panel.px(p), panel.y(low), panel.y(high)
            x_value = "flat" if p.offered is None else f"{p.offered:g}"
            svg.add(f'<g class="spread" data-x="{x_value}" '
                    f'data-low="{low:g}" data-high="{high:g}">')  # fmt: skip
            svg.line(x, y0, x, y1, colour, ' stroke-width="1.2"')
            for y in (y0, y1):
                svg.line(x - 4, y, x + 4, y, colour, ' stroke-width="1.2"')
            svg.add("</g>")
    for p in points:
        where = "flat out" if p.offered is None else f"{p.offered:,.0f} msg/s offered"
        lost = f", {p.lost} lost" if p.lost else ""
        spread = ""
        if p.spread:
            low, high = p.spread[panel.key]
            spread = f" (median; runs {low:,.1f} to {high:,.1f})"
        title = f"{label}, {where}: {panel.value(p):,.1f} {unit}{spread}{lost}"
        x_value = "flat" if p.offered is None else f"{p.offered:g}"
        svg.marker(shape, panel.px(p), panel.y(panel.value(p)), colour, hollow,
                   f' class="point" data-x="{x_value}" data-y="{panel.value(p):g}"',
                   title)  # fmt: skip
    svg.add("</g>")


def describe(run: Run) -> str:
    """A footnote: where and when a file's figures were taken."""
    m = run.meta
    load = m.get("loadavg_before")
    bits = [str(m.get("date", "?"))[:16].replace("T", " ") + " UTC"]
    if m.get("commit") and m["commit"] != run.label:
        bits.insert(0, f"code at {m['commit']}")
    if isinstance(load, list) and load and isinstance(load[0], (int, float)):
        bits.append(f"load average {load[0]:.1f}")
    if isinstance(m.get("cpus"), int):
        bits.append(f"{m['cpus']} CPUs")
    if isinstance(m.get("runs"), int) and m["runs"] > 1:
        bits.append(f"medians of {m['runs']} runs (bars: lowest to highest)")
    return f"{run.label}: " + ", ".join(bits)


def render(runs: Sequence[Run], title: str | None = None) -> str:
    """The SVG document for `runs` (the last one drawn solid, on top)."""
    if not runs:
        raise PlotError("no sweep to draw: give one or more JSON files")
    panels = make_panels(runs)
    pairs = {run.meta.get("pairs") for run in runs}
    pairs_text = f", {pairs.pop()} pairs" if len(pairs) == 1 else ""
    per_row = len(KINDS)  # legend entries: a row per file
    entries = [(run, kind, name, colour, shape, i == len(runs) - 1)
               for i, run in enumerate(runs) for kind, name, colour, shape in KINDS]  # fmt: skip
    rows = (len(entries) + per_row - 1) // per_row
    y0 = PANELS[0][3] + 68  # the legend's first row
    height = y0 + rows * 20 + len(runs) * 15 + 8  # and a line of notes per file
    svg = Svg()
    svg.add(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="{FONT}" fill="{INK}">')  # fmt: skip
    heading = title or "Load sweep: the server and the bare UDP loop, offered load across"
    svg.add(f"<title>{escape(heading)}</title>")
    svg.add(f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>')
    svg.text(WIDTH / 2, 24, heading, 15, extra=' font-weight="bold"')
    for panel in panels:
        svg.add(f'<g class="panel" id="panel-{panel.key}">')
        draw_axes(svg, panel, f"offered load, msg/s in all{pairs_text}")
        for i, run in enumerate(runs):
            last = i == len(runs) - 1
            for kind, name, colour, shape in reversed(KINDS):  # the server's on top
                draw_series(svg, panel, run, kind, name, colour, shape, not last, not last)
        svg.add("</g>")
    # The legend: one entry per file and relay, in rows under the panels.
    svg.add('<g class="legend">')
    column = (WIDTH - 80) / per_row
    for i, (run, kind, name, colour, shape, last) in enumerate(entries):
        x = 40 + (i % per_row) * column
        y = y0 + (i // per_row) * 20
        dash = "" if last else f' stroke-dasharray="{DASH}"'
        svg.add(f"<g class=\"entry\" data-kind={quoteattr(kind)} "
                f"data-label={quoteattr(run.label)}>")  # fmt: skip
        svg.line(x, y, x + 28, y, colour, f' stroke-width="2"{dash}')
        svg.marker(shape, x + 14, y, colour, not last)
        svg.text(x + 36, y + 4, f"{name}, {run.label}", anchor="start")
        svg.add("</g>")
    svg.add("</g>")
    for i, run in enumerate(runs):
        y = y0 + rows * 20 + 4 + i * 15
        svg.text(40, y, describe(run), 11, "start", f' fill="{FAINT}" class="notes"')
    svg.add("</svg>")
    return "\n".join(svg.parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="SWEEP.json",
        help="python -m bench.sweep --json-out files, earliest first",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUT,
        help="the SVG to write (default docs/bench/load.svg)",
    )
    parser.add_argument("--labels", help="the legend's names for the files, comma-separated "
                        "(default: each file's --label, else its commit)")  # fmt: skip
    parser.add_argument("--title", help="the figure's title")
    args = parser.parse_args(argv)
    labels: list[str | None] = [None] * len(args.files)
    if args.labels is not None:
        given = [part.strip() for part in args.labels.split(",")]
        if len(given) != len(args.files) or not all(given):
            parser.error(f"argument --labels: {len(given)} names for {len(args.files)} files; "
                         "give one non-empty name per file")  # fmt: skip
        labels = list(given)
    try:
        runs = [load_run(path, label) for path, label in zip(args.files, labels, strict=True)]
        document = render(runs, args.title)
    except PlotError as e:
        print(f"python -m bench.plot: {e}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(document, "utf-8")
    print(f"SVG: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
