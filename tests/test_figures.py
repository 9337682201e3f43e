"""The analysis charts show their tables' numbers: bar heights are the tables' values in percent,
the labels on the bars are the markdown cells, a missing value is an ``n/a`` mark and no bar, every
chart has a title, its metric on the y-axis and the n behind each group; per-class F1 against
scikit-learn, the reliability bins against a brute-force pass; plotting leaves matplotlib's
backend (and pyplot) alone. Everything is read back from the figures' artists, not the images."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jomed_fast.analysis import (
    Candidate,
    PredictionRecord,
    inconsistency_shares,
    per_class_f1,
    reliability,
    split_consistency,
    write_calibration,
    write_consistency_tables,
    write_jsonl,
    write_per_class_f1,
)
from jomed_fast.analysis.figures import MISSING, ChartSpec, bar_chart, display_name, reliability_chart
from jomed_fast.cli import main
from jomed_fast.eval import prediction_metrics


def _records(seed: int, n: int = 48, c: int = 4, k: int = 3, right: float = 0.6, kind: str = "multiclass") -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gold = int(rng.integers(0, c - 1))  # the last class is never a gold answer,
        cands = [
            Candidate(
                f"c{j}", "text", float(rng.random()), [], gold if rng.random() < right else int(rng.integers(0, c))
            )
            for j in range(k)
        ]
        probs = rng.dirichlet(np.full(c, 0.7))
        fused = int(np.argmax(probs[:-1]))  # nor is it ever the fused answer: its F1 is undefined
        out.append(PredictionRecord(f"q{i}", gold, kind, cands, fused, [float(p) for p in probs]))
    return out


SYSTEMS = {"reader_only": _records(0, k=1), "ft_rag": _records(1), "jomed": _records(2, right=0.8)}


def _markdown_cells(path) -> dict:
    """``{row: {column: cell}}`` of a table ``write_analysis`` wrote as markdown."""
    lines = path.read_text().splitlines()
    cols = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(cols, cells[1:]))
    return rows


def _bars(ax, rows: list, cols: list) -> dict:
    """``{(row, column): (height, label)}`` read from the axes: each series is a container whose
    legend label starts with the row's display name; a bar belongs to the tick nearest its centre."""
    ticks = ax.get_xticks()
    out = {}
    for container in ax.containers:
        (row,) = [r for r in rows if container.get_label().startswith(display_name(r))]
        labels = [t for t in ax.texts if getattr(t, "xy", None) is not None]
        for patch in container.patches:
            centre = patch.get_x() + patch.get_width() / 2
            col = cols[int(np.argmin(np.abs(ticks - centre)))]
            text = [
                t.get_text()
                for t in labels
                if abs(t.xy[0] - centre) < 1e-9 and abs(t.xy[1] - patch.get_height()) < 1e-9
            ]
            out[(row, col)] = (patch.get_height(), text)
    return out


def _missing_marks(ax) -> list:
    return [t for t in ax.texts if t.get_text() == MISSING]


# ------------------------------------------------------------------------------------------ bar charts
def test_a_bar_chart_shows_the_table_and_draws_no_bar_for_a_missing_value():
    table = {
        "ft_rag": {"all": 0.625, "inconsistent": None, "consistent": 0.5},
        "jomed": {"all": 2 / 3, "inconsistent": 0.0, "consistent": 1.0},
    }
    spec = ChartSpec("A title", "accuracy (%)", column_n={"all": 12, "inconsistent": 0, "consistent": 12})
    ax = bar_chart(table, spec).axes[0]
    bars = _bars(ax, list(table), ["all", "inconsistent", "consistent"])
    present = {(r, c): v for r, row in table.items() for c, v in row.items() if v is not None}
    assert set(bars) == set(present)  # no bar where the value is missing, a zero is a bar
    for key, value in present.items():
        height, label = bars[key]
        assert height == 100 * value and label == [f"{100 * value:.1f}"]
    assert len(_missing_marks(ax)) == 1
    assert ax.get_title() == "A title" and ax.get_ylabel() == "accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all\n(n=12)", "inconsistent\n(n=0)", "consistent\n(n=12)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fine-tuned RAG", "JOMED"]


def test_the_consistency_charts_show_the_tables_written_beside_them(tmp_path):
    split = split_consistency(SYSTEMS["ft_rag"])
    tables = write_consistency_tables(str(tmp_path), SYSTEMS, split, extra={"split_from": "ft_rag"})
    n = {"all": 48, "inconsistent": len(split["inconsistent"]), "consistent": len(split["consistent"])}
    for metric, ylabel in (("accuracy", "accuracy (%)"), ("macro_f1", "macro-F1 (%)")):
        stored = json.loads((tmp_path / f"consistency_{metric}.json").read_text())["table"]
        assert stored == tables[metric]["systems"]
        cells = _markdown_cells(tmp_path / f"consistency_{metric}.md")
        assert (tmp_path / f"consistency_{metric}.png").stat().st_size > 0
        # the chart write_analysis drew for this table, rebuilt from the JSON it wrote
        spec = ChartSpec(f"{metric} by split", ylabel, column_n=tables[metric]["n"])
        ax = bar_chart(stored, spec).axes[0]
        bars = _bars(ax, list(stored), list(stored["jomed"]))  # the JSON's key order, as drawn
        assert len(bars) == 9
        for (row, col), (height, label) in bars.items():
            assert height == 100 * stored[row][col] and label == [cells[row][col]]
        assert tables[metric]["n"] == n
    # each system's own share of queries whose candidates disagree; reader only has one candidate
    shares = json.loads((tmp_path / "consistency_split.json").read_text())["table"]
    assert shares == inconsistency_shares(SYSTEMS)
    assert shares["reader_only"] == {"inconsistent": None, "consistent": None}
    for name in ("ft_rag", "jomed"):
        brute = sum(len({c.prediction for c in r.candidates}) > 1 for r in SYSTEMS[name]) / 48
        assert (
            shares[name]["inconsistent"] == pytest.approx(brute)
            and _markdown_cells(tmp_path / "consistency_split.md")[name]["inconsistent"] == f"{100 * brute:.1f}"
        )
    ax = bar_chart(shares, ChartSpec("split", "share of queries (%)")).axes[0]
    assert len(_missing_marks(ax)) == 2 and len(_bars(ax, list(shares), ["inconsistent", "consistent"])) == 4


def test_display_names_are_readable():
    assert display_name("ft_rag") == "fine-tuned RAG" and display_name("reader_only") == "reader only"
    assert display_name("jomed_no_retrieval") == "JOMED no retrieval" and display_name("macro_f1") == "macro-F1"
    assert display_name("top1_confidence") == "top-1 confidence" and display_name("no query image") == "no query image"


# ------------------------------------------------------------------------------------------ per class
def test_per_class_f1_equals_sklearn_and_averages_to_macro_f1(tmp_path):
    from sklearn.metrics import f1_score

    recs = SYSTEMS["jomed"]
    got = per_class_f1(recs, 4)
    golds, preds = [r.gold for r in recs], [r.fused for r in recs]
    want = f1_score(golds, preds, labels=[0, 1, 2, 3], average=None, zero_division=0)
    for c in range(4):
        undefined = c not in golds and c not in preds
        assert (got["f1"][c] is None) == undefined
        assert got["f1"][c] == pytest.approx(want[c]) or undefined
    assert got["support"] == [golds.count(c) for c in range(4)]
    assert np.mean([f or 0.0 for f in got["f1"]]) == pytest.approx(prediction_metrics(recs, 4)["macro_f1"])

    # multi-label: one indicator column per label, as sklearn's on binarised sets
    rng = np.random.default_rng(5)
    ml = [
        PredictionRecord(
            f"m{i}",
            sorted({int(x) for x in rng.integers(0, 3, 2)}),
            "multilabel",
            [],
            sorted({int(x) for x in rng.integers(0, 3, 2)}),
        )
        for i in range(30)
    ]
    onehot = lambda sets: np.array([[c in s for c in range(3)] for s in sets])  # noqa: E731
    want = f1_score(onehot([r.gold for r in ml]), onehot([r.fused for r in ml]), average=None, zero_division=0)
    assert per_class_f1(ml, 3)["f1"] == pytest.approx(list(want))

    # the chart: one group per class (its support as n), the undefined class drawn as missing
    names = ["Normal", "Cyst", "Tumour", "Calcification"]
    written = write_per_class_f1(str(tmp_path), SYSTEMS, 4, names)
    stored = json.loads((tmp_path / "per_class_f1.json").read_text())
    assert stored["table"] == written["table"] and stored["support"] == dict(zip(names, got["support"]))
    assert stored["classes"] == names  # the JSON sorts its keys; the class order is kept apart
    table = {row: {c: stored["table"][row][c] for c in stored["classes"]} for row in SYSTEMS}
    spec = ChartSpec("F1 per class", "F1 (%)", column_n=stored["support"])
    ax = bar_chart(table, spec).axes[0]
    cells = _markdown_cells(tmp_path / "per_class_f1.md")
    for (row, col), (height, label) in _bars(ax, list(SYSTEMS), names).items():
        assert height == 100 * stored["table"][row][col] and label == [cells[row][col]]
    undefined = sum(v is None for row in stored["table"].values() for v in row.values())
    assert undefined >= 1 and len(_missing_marks(ax)) == undefined
    assert [t.get_text() for t in ax.get_xticklabels()][3] == "Calcification\n(n=0)"


# ------------------------------------------------------------------------------------------ calibration
def _brute_reliability(records, bins):
    rows, total = [], len(records)
    for m in range(bins):
        lo, hi = m / bins, (m + 1) / bins
        inside = []
        for r in records:
            c = r.fused_probs[r.fused]
            if lo <= c < hi or (m == bins - 1 and c == 1.0):
                inside.append((c, float(r.fused == r.gold)))
        rows.append(inside)
    ece = sum(len(b) / total * abs(sum(o for _, o in b) / len(b) - sum(c for c, _ in b) / len(b)) for b in rows if b)
    return rows, ece


def test_reliability_bins_equal_a_brute_force_pass_and_the_diagram_shows_them(tmp_path):
    recs = _records(7, n=200, c=3)
    # confidences on the bin edges (and 1.0) must land where the definition puts them
    for r, edge in zip(recs, (0.5, 0.7, 1.0, 0.4, 0.9)):
        r.fused_probs = [edge, 1.0 - edge, 0.0]
        r.fused = 0
    for bins in (10, 7):
        got = reliability(recs, bins)
        want, ece = _brute_reliability(recs, bins)
        assert got["n"] == 200 and got["ece"] == pytest.approx(ece, abs=1e-12)
        for row, inside in zip(got["bins"], want):
            assert row["n"] == len(inside)
            if inside:
                assert row["confidence"] == pytest.approx(sum(c for c, _ in inside) / len(inside), abs=1e-12)
                assert row["accuracy"] == pytest.approx(sum(o for _, o in inside) / len(inside), abs=1e-12)
            else:
                assert row["confidence"] is None and row["accuracy"] is None
    assert reliability([PredictionRecord("o", "x", "vqa_open", [], "x")]) is None

    table = write_calibration(str(tmp_path), {"ft_rag": recs, "jomed": SYSTEMS["jomed"]}, bins=10)
    assert json.loads((tmp_path / "calibration.json").read_text())["systems"] == table
    fig = reliability_chart(table, "Reliability")
    assert fig.get_suptitle() == "Reliability"
    for ax, (name, rel) in zip(fig.axes, table.items()):
        full = [b for b in rel["bins"] if b["n"] > 0]
        (bars,) = ax.containers
        assert [p.get_height() for p in bars.patches] == [100 * b["accuracy"] for b in full]
        assert [p.get_x() + p.get_width() / 2 for p in bars.patches] == pytest.approx(
            [50 * (b["lo"] + b["hi"]) for b in full]
        )
        labels = [t.get_text() for t in ax.texts if t.get_text() != MISSING]
        assert labels == [f"{100 * b['accuracy']:.1f}\nn={b['n']}" for b in full]
        assert len(_missing_marks(ax)) == sum(b["n"] == 0 for b in rel["bins"])
        assert ax.get_ylabel() == "accuracy (%)" and display_name(name) in ax.get_title()
        assert f"ECE {100 * rel['ece']:.1f}%" in ax.get_title()


# ------------------------------------------------------------------------------------------ backend
def test_plotting_leaves_the_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend (here: svg) is what it was after every chart is written, and pyplot is
    never imported (no figure joins the user's open figures)."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from test_figures import SYSTEMS
from jomed_fast.analysis import split_consistency, write_calibration, write_consistency_tables, write_per_class_f1
out = {str(tmp_path)!r}
write_consistency_tables(out, SYSTEMS, split_consistency(SYSTEMS["ft_rag"]))
write_per_class_f1(out, SYSTEMS, 4)
write_calibration(out, SYSTEMS)
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["svg", "False"]
    for name in ("consistency_accuracy", "consistency_macro_f1", "consistency_split", "per_class_f1", "calibration"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# ------------------------------------------------------------------------------------------ analyze
def test_analyze_writes_every_chart(tmp_path, capsys):
    for name, recs in SYSTEMS.items():
        write_jsonl(str(tmp_path / f"{name}.jsonl"), recs)
    argv = ["analyze", "--out", str(tmp_path / "report")]
    argv += [a for name in SYSTEMS for a in ("--system", f"{name}={tmp_path / name}.jsonl")]
    code = main([*argv, "--task", "derma"])
    err = capsys.readouterr().err
    assert code == 2 and "--task: derma has 7 classes, the predictions' distributions [4]" in err
    assert main(argv) == 0
    report = tmp_path / "report"
    for name in ("consistency_split", "per_class_f1", "calibration", "rerank"):
        assert (report / f"{name}.png").is_file(), name
    per_class = json.loads((report / "per_class_f1.json").read_text())["table"]
    assert set(per_class) == {"ft_rag", "jomed", "reader_only"} and list(per_class["jomed"]) == [
        f"class {c}" for c in range(4)
    ]
    assert math.isclose(per_class["jomed"]["class 0"], per_class_f1(SYSTEMS["jomed"], 4)["f1"][0])
