"""The domain-shift case end to end, as a user runs it (`mlxclip demo domain-shift`), on the CI
preset (~75 s): both stages, the guards, the WiSE-FT sweep, and a report whose tables parse. The
figures of the default preset are the README's; this checks the plumbing, the bookkeeping, and
that forgetting is there to be guarded against."""

import json
import re
import subprocess
import sys

import pytest

from mlx_clip.data.shift import make_shift_domains

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    out = tmp_path_factory.mktemp("shift")
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "demo", "domain-shift", "--preset", "ci",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, json.loads((out / "domain_shift.json").read_text()), proc.stdout


def table_rows(markdown: str, header: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_files_and_every_row(case):
    out, data, stdout = case
    assert data["status"] == "complete"
    for suffix in ("json", "md", "png"):
        assert (out / f"domain_shift.{suffix}").stat().st_size > 0
    names = [r["name"] for r in data["rows"]]
    assert names[0] == "base" and {"fine-tune", "lp-ft", "l2-sp"} <= set(names)
    # Alpha 0 is the base itself, whose control score is the floor's own start: some alpha always
    # meets the budget, so the sweep always chooses one and its row is always there (0.25 measured).
    assert "wise-ft" in names and data["wise_ft"]["best_alpha"] is not None
    for run in ("stage-a", "fine-tune", "lp-ft", "l2-sp-20", "l2-sp-100"):
        assert (out / run / "final" / "model.safetensors").is_file()
    assert "Domain shift" in stdout and "[5/5]" in stdout  # the user sees progress and the report


def test_markdown_table_matches_the_json(case):
    out, data, _ = case
    md = (out / "domain_shift.md").read_text()
    rows = {r[0]: r for r in table_rows(md, "| model |")}
    base = next(r for r in data["rows"] if r["name"] == "base")
    for r in data["rows"]:
        label = {"base": "base (stage A)", "fine-tune": "fine-tune", "wise-ft": "WiSE-FT", "lp-ft": "LP-FT",
                 "l2-sp": "L2-SP"}[r["name"]]
        cells = rows[label]
        assert float(cells[1]) == pytest.approx(r["target"], abs=6e-4)
        assert float(cells[3]) == pytest.approx(r["control"], abs=6e-4)
        if r["name"] != "base":
            assert float(cells[4]) == pytest.approx(r["control"] - base["control"], abs=1e-3)
            assert cells[5] == ("yes" if base["control"] - r["control"] <= data["budget"] + 1e-9 else "no")
    alphas = [float(re.sub(r"\s*\*\*\(chosen\)\*\*", "", r[0])) for r in table_rows(md, "| alpha |")]
    assert alphas == [p["alpha"] for p in data["wise_ft"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_bookkeeping_is_consistent(case):
    """The sweep's ends are the base and the plain fine-tune, measured by two different paths
    (the trainer's evaluator and `wise-ft --sweep`): they must agree exactly."""
    _, data, _ = case
    points = {p["alpha"]: p for p in data["wise_ft"]["points"]}
    rows = {r["name"]: r for r in data["rows"]}
    assert points[0.0]["target"]["acc1"] == pytest.approx(rows["base"]["target"])
    assert points[0.0]["control"]["acc1"] == pytest.approx(rows["base"]["control"])
    assert points[1.0]["target"]["acc1"] == pytest.approx(rows["fine-tune"]["target"])
    assert points[1.0]["control"]["acc1"] == pytest.approx(rows["fine-tune"]["control"])
    assert data["stage_a"]["a_after"] == pytest.approx(rows["base"]["control"])
    if data["wise_ft"]["best_alpha"] is not None:
        assert rows["base"]["control"] - rows["wise-ft"]["control"] <= data["budget"] + 1e-9
    lambdas = {q["lambda"]: q for q in data["l2_sp"]["points"]}
    assert sorted(lambdas) == [20.0, 100.0]
    chosen = data["l2_sp"]["chosen"]
    if chosen is not None:
        assert rows["l2-sp"]["control"] == lambdas[chosen]["control"]
        assert rows["base"]["control"] - rows["l2-sp"]["control"] <= data["budget"] + 1e-9
        assert all(q["target"] <= lambdas[chosen]["target"] for q in lambdas.values()
                   if rows["base"]["control"] - q["control"] <= data["budget"] + 1e-9)
    assert rows["fine-tune"]["target"] > rows["base"]["target"]  # stage B learns B


def test_forgetting_is_real_even_in_the_small_preset(case):
    """Plain fine-tuning on B costs A more than the budget: the case has something to guard."""
    _, data, _ = case
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["base"]["control"] >= 0.3  # stage A learnt A (12 classes: chance is 0.083)
    assert rows["base"]["control"] - rows["fine-tune"]["control"] > 2 * data["budget"]


def test_a_second_run_replaces_its_own_folder_and_refuses_a_foreign_one(tmp_path):
    from mlx_clip.robust.domain_shift import MARKER, _claim
    from mlx_clip.errors import ConfigError

    earlier = tmp_path / "earlier"
    (earlier / "stage-a" / "final").mkdir(parents=True)
    (earlier / MARKER).write_text("{}")
    _claim(earlier)  # an earlier run of the case: its sub-runs go
    assert not (earlier / "stage-a").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no domain_shift.json"):
        _claim(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_domains_are_deterministic_and_disjoint(tmp_path):
    a = make_shift_domains(tmp_path / "x", image_size=16, per_class_train=2, per_class_val=1, seed=3)
    b = make_shift_domains(tmp_path / "y", image_size=16, per_class_train=2, per_class_val=1, seed=3)
    files = sorted(p.relative_to(a["root"]) for p in a["root"].rglob("*.png"))
    assert files and files == sorted(p.relative_to(b["root"]) for p in b["root"].rglob("*.png"))
    assert all((a["root"] / f).read_bytes() == (b["root"] / f).read_bytes() for f in files)
    classes_a = {p.name for p in (a["a"] / "train").iterdir()}
    classes_b = {p.name for p in (a["b"] / "train").iterdir()}
    assert len(classes_a) == 12 and len(classes_b) == 16 and not classes_a & classes_b
    words = lambda names: {w for n in names for w in n.split("_")}  # noqa: E731
    assert not words(classes_a) & words(classes_b)  # no class word carries over from A to B


def test_lambda_is_chosen_by_the_wise_ft_rule():
    from mlx_clip.robust.domain_shift import choose_lambda

    points = [{"lambda": 20.0, "target": 0.97, "control": 0.60}, {"lambda": 50.0, "target": 0.87, "control": 0.93},
              {"lambda": 100.0, "target": 0.77, "control": 0.95}]
    assert choose_lambda(points, 0.917)["chosen"] == 50.0  # the best target within the budget
    assert choose_lambda(points, 0.94)["chosen"] == 100.0
    assert choose_lambda(points, 0.99)["chosen"] is None
