"""bench/plot.py: the load sweep's SVG, drawn from `python -m bench.sweep`'s
JSON with the standard library alone.

Known inputs go in, the SVG is parsed back (xml.etree) and read like a
figure is read: the series of both relays for every file, the axes' labels,
each marker where the axis ticks say its value is; a file that is not a
sweep's JSON is refused with a message naming it and what to do, and no
SVG is written. The committed figure (docs/bench/load.svg) is checked too.
"""

from __future__ import annotations

import json
import math
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench import plot, sweep
from bench.sweep import FORMAT, VERSION
from tests.conftest import ROOT

SVG = "{http://www.w3.org/2000/svg}"


def figures(msgs_per_s: float, cpu_us_per_msg: float, lost: int = 0) -> dict[str, Any]:
    return {"msgs_per_s": msgs_per_s, "cpu_us_per_msg": cpu_us_per_msg, "lost": lost,
            "duplicates": 0}  # fmt: skip


def sweep_document(label: str, server_scale: float = 1.0) -> dict[str, Any]:
    """A sweep at 100, 1,000 and 10,000 msg/s offered, then flat out: every
    value on a decade, so that it sits on a labelled tick."""
    points = [
        {"offered": offered, "server": figures(offered, 1000 / server_scale),
         "bare": figures(offered, 10.0)}
        for offered in (100.0, 1000.0, 10000.0)
    ]  # fmt: skip
    points.append({"offered": None, "server": figures(10000 * server_scale, 100.0),
                   "bare": figures(100000.0, 10.0)})  # fmt: skip
    return {
        "format": FORMAT, "version": VERSION, "points": points,
        "meta": {"label": label, "commit": "abc1234", "pairs": 16, "cpus": 2,
                 "date": "2026-12-05T18:00:00+00:00", "loadavg_before": [1.5, 1.0, 1.0]},
    }  # fmt: skip


def write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document), "utf-8")
    return path


def draw(tmp_path: Path, *documents: dict[str, Any]) -> ET.Element:
    runs = [
        plot.load_run(write(tmp_path / f"sweep{i}.json", doc)) for i, doc in enumerate(documents)
    ]
    return ET.fromstring(plot.render(runs))


def panel(root: ET.Element, key: str) -> ET.Element:
    (found,) = [g for g in root.iter(f"{SVG}g") if g.get("id") == f"panel-{key}"]
    return found


def tick_positions(panel_element: ET.Element, axis: str) -> dict[str, float]:
    """A panel's ticks: value -> pixel (the tick's grid or mark line)."""
    out = {}
    for g in panel_element.iter(f"{SVG}g"):
        classes = (g.get("class") or "").split()
        if "tick" in classes and axis in classes:
            line = g.find(f"{SVG}line")
            assert line is not None
            out[g.get("data-value", "")] = float(line.get("x1" if axis == "x" else "y1", "nan"))
    return out


def marker_xy(element: ET.Element) -> tuple[float, float]:
    if element.tag == f"{SVG}circle":
        return float(element.get("cx", "nan")), float(element.get("cy", "nan"))
    return float(element.get("x", "nan")) + 3.5, float(element.get("y", "nan")) + 3.5


def series(root: ET.Element, key: str) -> dict[tuple[str, str], ET.Element]:
    return {
        (g.get("data-kind", ""), g.get("data-label", "")): g
        for g in panel(root, key).iter(f"{SVG}g")
        if g.get("class") == "series"
    }


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_the_svg_has_both_relays_of_every_file_and_labelled_axes(tmp_path: Path) -> None:
    root = draw(tmp_path, sweep_document("before"), sweep_document("after", 2.0))
    assert root.tag == f"{SVG}svg"
    for key in ("rate", "cpu"):
        found = series(root, key)
        assert set(found) == {(k, lab) for k in ("server", "bare") for lab in ("before", "after")}
        for g in found.values():  # three paced points joined, and the flat-out one
            assert len([e for e in g.iter() if e.get("class") == "point"]) == 4
            assert g.find(f"{SVG}polyline") is not None
        labels = {"".join(t.itertext()) for t in panel(root, key).iter(f"{SVG}text")
                  if "axis-label" in (t.get("class") or "")}  # fmt: skip
        y_label = "delivered msg/s" if key == "rate" else "CPU \u00b5s per delivered message"
        assert labels == {"offered load, msg/s in all, 16 pairs", y_label}
        # Labelled ticks: decades on both axes, and the flat-out column.
        words = {"".join(t.itertext()) for t in panel(root, key).iter(f"{SVG}text")}
        assert {"100", "1k", "10k", "flat out"} <= words
    legend = [g for g in root.iter(f"{SVG}g") if g.get("class") == "entry"]
    assert [(g.get("data-kind"), g.get("data-label")) for g in legend] == [
        ("server", "before"),
        ("bare", "before"),
        ("server", "after"),
        ("bare", "after"),
    ]
    everything = texts(root)
    for entry in ("server, before", "bare loop, before", "server, after", "bare loop, after"):
        assert entry in everything
    # The earlier file is dashed with hollow markers, the last one solid and filled.
    before, after = (
        series(root, "rate")[("server", "before")],
        series(root, "rate")[("server", "after")],
    )
    assert before.find(f"{SVG}polyline").get("stroke-dasharray")  # type: ignore[union-attr]
    assert after.find(f"{SVG}polyline").get("stroke-dasharray") is None  # type: ignore[union-attr]
    assert next(before.iter(f"{SVG}circle")).get("fill") == "#ffffff"
    assert next(after.iter(f"{SVG}circle")).get("fill") != "#ffffff"


def test_each_value_lands_where_the_axes_say_it_is(tmp_path: Path) -> None:
    root = draw(tmp_path, sweep_document("only"))
    for key in ("rate", "cpu"):
        p = panel(root, key)
        xs, ys = tick_positions(p, "x"), tick_positions(p, "y")
        assert "flat out" in xs
        checked = 0
        for g in (g for g in p.iter(f"{SVG}g") if g.get("class") == "series"):
            for element in g.iter():
                if element.get("class") != "point":
                    continue
                x, y = marker_xy(element)
                x_value, y_value = element.get("data-x", ""), element.get("data-y", "")
                assert x == pytest.approx(xs["flat out" if x_value == "flat" else x_value], abs=0.1)
                assert y == pytest.approx(ys[y_value], abs=0.1), (key, x_value, y_value)
                checked += 1
        assert checked == 8
        # Up the page is up the scale, and across is up the load.
        assert ys["100"] > ys["1000"]
        assert xs["100"] < xs["1000"] < xs["10000"] < xs["flat out"]
    # A value between ticks sits where a log scale puts it: 10^2.5 half-way
    # between 100 and 1,000.
    scale = plot.LogScale(100, 10000, 0, 200)
    assert scale(10**2.5) == pytest.approx(50)
    assert scale(1000) == pytest.approx(100)


def test_the_line_where_delivered_equals_offered(tmp_path: Path) -> None:
    """A relay that keeps up sits on the reference line: here the server's
    paced points, delivered = offered, lie on it."""
    root = draw(tmp_path, sweep_document("only"))
    p = panel(root, "rate")
    (reference,) = [e for e in p.iter(f"{SVG}line") if e.get("class") == "reference"]
    x0, y0, x1, y1 = (float(reference.get(a, "nan")) for a in ("x1", "y1", "x2", "y2"))
    server = series(root, "rate")[("server", "only")]
    for element in server.iter():
        if element.get("class") == "point" and element.get("data-x") != "flat":
            x, y = marker_xy(element)
            assert y == pytest.approx(y0 + (x - x0) * (y1 - y0) / (x1 - x0), abs=0.1)


def test_the_command_draws_two_sweeps_with_their_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = write(tmp_path / "before.json", sweep_document("a62059a"))
    after = write(tmp_path / "after.json", sweep_document("b0b0b0b", 2.0))
    out = tmp_path / "figures" / "load.svg"
    code = plot.main([str(before), str(after), "-o", str(out), "--labels", "before,after"])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    root = ET.parse(out).getroot()
    words = texts(root)
    assert "server, before" in words and "bare loop, after" in words
    notes = [w for w in words if w.startswith("before: ")]
    assert notes and "code at abc1234" in notes[0] and "load average 1.5" in notes[0]


def test_a_zero_is_left_off_a_log_scale(tmp_path: Path) -> None:
    """A point whose figure is 0 (a relay that delivered nothing) has no place
    on a log scale: it is left off, and the rest is drawn."""
    document = sweep_document("only")
    document["points"][0]["bare"]["cpu_us_per_msg"] = 0.0
    root = draw(tmp_path, document)
    bare = series(root, "cpu")[("bare", "only")]
    assert len([e for e in bare.iter() if e.get("class") == "point"]) == 3
    assert len([e for e in series(root, "rate")[("bare", "only")].iter()
                if e.get("class") == "point"]) == 4  # fmt: skip


def test_what_the_notes_cannot_read_is_left_out(tmp_path: Path) -> None:
    """The notes under the legend take what they can from a file's `meta`
    (hand-edited, or from a later version) and leave the rest out."""
    document = sweep_document("odd")
    document["meta"].update(loadavg_before="high", cpus="two", commit="odd")
    root = draw(tmp_path, document)
    (note,) = [w for w in texts(root) if w.startswith("odd: ")]
    assert note == "odd: 2026-12-05 18:00 UTC"


def several_runs() -> dict[str, Any]:
    """Three runs whose server CPU per message is 10, 100 and 1,000 us at
    every point (the bare loop's the same in all): the medians are 100."""
    runs = []
    for cpu in (10.0, 100.0, 1000.0):
        run = sweep_document("three")["points"]
        for point in run:
            point["server"]["cpu_us_per_msg"] = cpu
        runs.append(run)
    document = sweep_document("three")
    document["points"] = sweep.median_points(runs)
    document["runs"] = runs
    document["meta"]["runs"] = 3
    return document


def test_several_runs_draw_their_medians_and_each_spread(tmp_path: Path) -> None:
    root = draw(tmp_path, several_runs())
    p = panel(root, "cpu")
    xs, ys = tick_positions(p, "x"), tick_positions(p, "y")
    server = series(root, "cpu")[("server", "three")]
    bars = [g for g in server if g.get("class") == "spread"]
    assert len(bars) == 4  # a bar at every point, from the lowest run to the highest
    for bar in bars:
        assert (bar.get("data-low"), bar.get("data-high")) == ("10", "1000")
        x_value = bar.get("data-x", "")
        upright = bar.find(f"{SVG}line")
        assert upright is not None
        assert float(upright.get("x1", "nan")) == pytest.approx(
            xs["flat out" if x_value == "flat" else x_value], abs=0.1
        )
        assert float(upright.get("y1", "nan")) == pytest.approx(ys["10"], abs=0.1)
        assert float(upright.get("y2", "nan")) == pytest.approx(ys["1000"], abs=0.1)
    markers = [e for e in server.iter() if e.get("class") == "point"]
    assert {e.get("data-y") for e in markers} == {"100"}  # the medians
    assert all(marker_xy(e)[1] == pytest.approx(ys["100"], abs=0.1) for e in markers)
    # Each marker's tooltip: the title of the group around it.
    (holder, *_) = [g for g in server.iter(f"{SVG}g") if g.find(f"{SVG}circle") is not None]
    title = holder.find(f"{SVG}title")
    assert title is not None and "(median; runs 10.0 to 1,000.0)" in (title.text or "")
    (note,) = [w for w in texts(root) if w.startswith("three: ")]
    assert note.endswith(", medians of 3 runs (bars: lowest to highest)"), note
    # The bare loop's runs agree: no bar; the rate panel's runs agree too.
    assert not [g for g in series(root, "cpu")[("bare", "three")] if g.get("class") == "spread"]
    assert not [g for g in panel(root, "rate").iter(f"{SVG}g") if g.get("class") == "spread"]


def test_the_median_of_runs_keeps_the_worst_loss() -> None:
    """Several sweeps make one: the median of each figure, but a message
    lost or duplicated in any run shows in the result."""
    runs = [sweep_document("x")["points"] for _ in range(3)]
    for i, run in enumerate(runs):
        run[0]["server"].update(msgs_per_s=100.0 + 10 * i, lost=[0, 2, 0][i])
        run[0]["bare"]["duplicates"] = [0, 0, 1][i]
    (first, *rest) = sweep.median_points(runs)
    assert first["offered"] == 100.0 and first["server"]["msgs_per_s"] == 110.0
    assert first["server"]["lost"] == 2 and first["bare"]["duplicates"] == 1
    assert rest == sweep_document("x")["points"][1:]


def test_sweeps_of_several_benchmark_runs_combine_into_one_of_runs(tmp_path: Path) -> None:
    """`python -m bench --runs 3` runs the sweep once per run; its median
    document is theirs combined: medians as points, each run kept, drawn
    with the runs' spread."""
    documents = []
    for cpu in (10.0, 100.0, 1000.0):
        document = sweep_document("bench")
        document["meta"]["loadavg_after"] = [cpu, 0.0, 0.0]
        for point in document["points"]:
            point["server"]["cpu_us_per_msg"] = cpu
        documents.append(document)
    combined = sweep.combine(documents)
    assert combined["meta"]["runs"] == 3 and combined["meta"]["loadavg_after"][0] == 1000.0
    assert combined["runs"] == [d["points"] for d in documents]
    assert {p["server"]["cpu_us_per_msg"] for p in combined["points"]} == {100.0}
    root = draw(tmp_path, combined)
    bars = [g for g in series(root, "cpu")[("server", "bench")] if g.get("class") == "spread"]
    assert len(bars) == 4


def _without(document: dict[str, Any], *path: Any) -> dict[str, Any]:
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return document


def _with(document: dict[str, Any], value: Any, *path: Any) -> dict[str, Any]:
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return document


BAD = {
    "missing": (None, "cannot read it"),
    "not-json": ("{'points': [", "bad JSON at line 1"),
    "not-utf8": (b"\xff\xfe{}", "not UTF-8"),
    "a-list": ("[]", "no \"format\""),
    "the-benchmark's-json": (json.dumps({"meta": {}, "median": {}, "runs": []}), "no \"format\""),
    "other-version": (json.dumps(_with(sweep_document("x"), 99, "version")), "version 99"),
    "no-points": (json.dumps(_with(sweep_document("x"), [], "points")), "non-empty \"points\""),
    "no-bare": (json.dumps(_without(sweep_document("x"), "points", 1, "bare")),
                "points[1] has no 'bare' figures"),
    "no-cpu": (json.dumps(_without(sweep_document("x"), "points", 2, "server", "cpu_us_per_msg")),
               "points[2].server.cpu_us_per_msg is None, not a number"),
    "text-rate": (json.dumps(_with(sweep_document("x"), "fast", "points", 0, "bare",
                                   "msgs_per_s")), "points[0].bare.msgs_per_s is 'fast'"),
    "runs-not-a-list": (json.dumps(_with(sweep_document("x"), "x", "runs")),
                        "\"runs\" is not a list of runs' points"),
    "runs-other-loads": (json.dumps(_with(sweep_document("x"), [sweep_document("x")["points"][1:]],
                                          "runs")), "runs[0] has other loads than \"points\""),
    "runs-bad-point": (json.dumps(_with(sweep_document("x"), [[{"offered": None}]], "runs")),
                       "runs[0].points[0] has no 'server' figures"),
    "zero-load": (json.dumps(_with(sweep_document("x"), 0, "points", 0, "offered")),
                  "points[0].offered is 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_file_that_is_not_a_sweep_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    content, reason = BAD[case]
    path = tmp_path / f"{case}.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, "utf-8")
    good = write(tmp_path / "good.json", sweep_document("good"))
    out = tmp_path / "load.svg"
    out.write_text("the figure before", "utf-8")
    assert plot.main([str(good), str(path), "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"python -m bench.plot: {path}"), error
    assert reason in error, error
    if case not in ("other-version", "missing"):
        assert "python -m bench.sweep --json-out FILE" in error, error
    assert out.read_text("utf-8") == "the figure before"  # nothing written


def test_labels_must_match_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.json", sweep_document("good"))
    with pytest.raises(SystemExit) as exited:
        plot.main([str(good), "--labels", "a,b", "-o", str(tmp_path / "x.svg")])
    assert exited.value.code == 2
    assert "2 names for 1 files" in capsys.readouterr().err
    assert not (tmp_path / "x.svg").exists()


def test_the_committed_figure_parses_and_the_readme_links_it() -> None:
    figure = ROOT / "docs" / "bench" / "load.svg"
    root = ET.parse(figure).getroot()
    for key in ("rate", "cpu"):
        kinds = {kind for kind, _ in series(root, key)}
        assert kinds == {"server", "bare"}, key
        values = [
            float(e.get("data-y", "nan"))
            for g in series(root, key).values()
            for e in g.iter()
            if e.get("class") == "point"
        ]
        assert values and all(math.isfinite(v) and v > 0 for v in values)
    readme = (ROOT / "README.md").read_text("utf-8")
    performance = readme[readme.index("\n## Performance") :]
    assert "docs/bench/load.svg" in performance


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--pairs", "0"], "argument --pairs: 0; give 1 or more"),
        (["--duration", "0"], "argument --duration: 0 s; give more than 0 seconds"),
        (["--duration", "nan"], "argument --duration: nan s"),
        (["--loads", "150,x"], "'150,x': give msg/s in all as numbers separated by commas"),
        (["--loads", "0,600"], "'0,600': give one or more loads above 0 msg/s"),
        (["--loads", "inf"], "'inf': give one or more loads above 0 msg/s"),
        (["--loads", ","], "',': give one or more loads above 0 msg/s"),
    ],
)
def test_the_sweep_refuses_sizes_it_cannot_run(
    args: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything starts, with what to give instead."""
    with pytest.raises(SystemExit) as exited:
        sweep.main(args)
    assert exited.value.code == 2
    assert reason in capsys.readouterr().err


def test_the_sweep_names_the_last_commit_of_the_code_under_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meta.commit`: a commit that touches only the benchmark, the tests or
    the documents does not change what a sweep measures, so the sweep names
    the last one before it that changed anything else; "+" for changes to
    the code not committed yet, "unknown" outside a git checkout."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    assert sweep.code_commit() == "unknown"
    git("init", "-q")
    (tmp_path / "chat_server.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "code")
    code = git("rev-parse", "--short", "HEAD")
    for path in ("bench/sweep.py", "tests/test_x.py", "docs/notes.txt", "README.md"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("y\n")
        git("add", "-A")
        git("commit", "-qm", f"not code: {path}")
    assert sweep.code_commit() == code
    (tmp_path / "bench" / "sweep.py").write_text("z\n")  # uncommitted, not code
    assert sweep.code_commit() == code
    (tmp_path / "chat_server.py").write_text("x = 2\n")
    assert sweep.code_commit() == code + "+"
