"""The results tables of README.md and docs/ equal the committed JSON they come from (bench/docs_tables.py),
and the figures bench judges by are the performance contract's (docs/design.md). Pure file reading."""

from __future__ import annotations

import os
import re

import pytest

from bench import docs_tables, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def test_every_marked_table_equals_its_json():
    stale = []
    for page in docs_tables.pages():
        stale += docs_tables.refresh(_read(page), page)[1]
    assert not stale, "tables that differ from their JSON (run `python -m bench.docs_tables`):\n" + "\n".join(stale)


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md", "docs/distributed.md", "docs/report.md"])
def test_results_pages_carry_marked_tables(page):
    """The markers themselves cannot vanish unnoticed: every results page keeps its generated tables."""
    found = docs_tables.regions(_read(page))
    assert found, page
    for _, spec, body in found:
        kind, sources, _ = docs_tables.parse_spec(spec)
        assert body.startswith("| ") and kind in docs_tables.RENDERERS
        assert all(os.path.isfile(os.path.join(docs_tables.RESULTS, s)) for s in sources), spec


def test_the_check_names_a_table_whose_figure_was_edited_by_hand():
    page = "docs/benchmarks.md"
    text = _read(page)
    line, spec, body = docs_tables.regions(text)[0]
    row = next(r for r in body.splitlines() if re.search(r"\| \d+\.\d ", r))
    figure = re.search(r"\| (\d+\.\d) ", row).group(1)
    edited = text.replace(row, row.replace(f"| {figure} ", f"| {float(figure) + 1:.1f} ", 1), 1)
    fixed, changed = docs_tables.refresh(edited, page)
    assert changed == [f"{page}:{line}: {spec}"] and fixed == text


def test_a_bad_marker_is_an_error_naming_page_and_line():
    text = "intro\n\n<!-- table: step no_such_run.json -->\n| old |\n<!-- end table -->\n"
    with pytest.raises(ValueError, match=r"page\.md:3: .*no result file bench/results/no_such_run\.json"):
        docs_tables.refresh(text, "page.md")
    with pytest.raises(ValueError, match="unknown table kind 'steps'"):
        docs_tables.refresh(text.replace("table: step ", "table: steps "), "page.md")
    with pytest.raises(ValueError, match="step takes no option row "):  # a misspelt option is not ignored
        docs_tables.refresh(text.replace("no_such_run.json", "step_cpu_20261201T180123.json row=torch"), "page.md")


def test_gpu_run_stage_table_gives_each_stage_the_profiles_budget():
    from bench.gpu.profiles import GPU

    rows = re.findall(r"^\| (\w+) \| .* \| (\d+) s \|$", _read("docs/benchmarks.md"), re.M)
    assert dict(rows) == {name: str(cfg["budget_s"]) for name, cfg in GPU["stages"].items()}


def test_bench_judges_by_the_performance_contracts_figures():
    """docs/design.md states each target bench/targets.py holds (the NS-method yardstick is the bench's
    own and is not in the contract)."""
    contract = _read("docs/design.md").split("## Performance contract", 1)[1].split("\n## ", 1)[0]
    contract = " ".join(contract.split())
    gpu = {k: t for k, (_, _, t) in targets.GPU.items()}
    for phrase in (f"within {gpu['x_floor']:g}× the floor", f"at least {gpu['vs_muon_adamw']:g}× faster than `torch.optim.Muon`",
                   f"at most {gpu['launches']} kernel launches", f"at most {targets.HOST_US} µs of host work",
                   f"at least {gpu['vs_reference']:g}× faster than the eager reference", "never slower than mango's own torch backend",
                   f"at least {targets.CPU['overhead']['target']:g}× faster than the reference",
                   f"within {targets.CPU['ns']['target']:g}× the bare textbook NS matmul time"):  # fmt: skip
        assert phrase in contract, phrase
    assert f"{targets.CPU['ns_gram']['target']:g}×" not in contract and "not a contract target" in targets.CPU["ns_gram"]["spec"]
