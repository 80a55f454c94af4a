"""The HTML report: self-contained, renders in a real headless browser, merges sources, never overclaims."""

from __future__ import annotations

import re
import shutil
import sys
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import Spec, build_results, verdict

from mtpbench.report import render_report

SECTIONS = ["headline", "throughput", "acceptance", "position", "tau", "efficiency", "categories", "compare-policy",
            "verdicts", "provenance"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two machines/policies: a bf16 sweep without verdicts, a q4 sweep with verdict rows (one a control)."""
    root = tmp_path_factory.mktemp("report")
    a = build_results(root / "mac", Spec(name="mac-m3", model="tiny-mtp", policy="bf16", host="mac", seed=1))
    spec_b = Spec(name="linux-cpu", model="tiny-mtp-q4", policy="q4", host="linux", ar_tok_s=25.0,
                  acceptance=(0.7, 0.6, 0.5), seed=2)
    spec_b.verdicts = [verdict(spec_b, 2, "greedy", "pit_ks", 0.31, False),
                       verdict(spec_b, 2, "greedy", "acceptance_z", 0.02, True),
                       verdict(spec_b, 2, "greedy", "pit_ks", 1e-12, True, control="residual_from_p")]
    b = build_results(root / "linux", spec_b)
    return a, b


@pytest.fixture(scope="module")
def merged(dirs, tmp_path_factory) -> Path:
    return render_report(list(dirs), tmp_path_factory.mktemp("out") / "merged.html", title="Merged <test>")


@pytest.fixture(scope="module")
def single(dirs, tmp_path_factory) -> Path:
    return render_report([dirs[0]], tmp_path_factory.mktemp("out") / "single.html")


class Resources(HTMLParser):
    """Collects every attribute or stylesheet text that could make a browser fetch something."""

    URL_ATTRS: ClassVar[set[str]] = {"src", "href", "xlink:href", "srcset", "action", "poster", "data", "formaction", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()
        self.ids: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            value = value or ""
            if name == "id":
                self.ids.append(value)
            if name in self.URL_ATTRS:
                self.refs.append(value)
            self.refs += re.findall(r"url\(([^)]*)\)", value)

    def handle_endtag(self, tag):
        self._in_style = False if tag == "style" else self._in_style

    def handle_data(self, data):
        if self._in_style:
            self.refs += re.findall(r"url\(([^)]*)\)", data) + re.findall(r"@import\s+([^;]+)", data)


def test_report_is_self_contained(merged):
    parser = Resources()
    parser.feed(merged.read_text())
    for ref in parser.refs:
        assert "//" not in ref and "http:" not in ref and "https:" not in ref, ref
        assert ref.startswith("#"), f"non-fragment reference {ref!r}"
    assert not parser.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert len(parser.ids) == len(set(parser.ids)), "duplicate element ids (e.g. SVG clip paths)"
    assert "<svg" in merged.read_text()


@contextmanager
def browser_page(html: Path, width: int):
    """Open a report in headless Chromium; yields (page, console errors, requested URLs). Never skips: a missing
    browser must fail loudly rather than hide a broken report."""
    try:
        from playwright import sync_api as playwright
    except ImportError:
        pytest.fail("the browser test needs `pip install playwright` (no `playwright install`: it uses Debian's chromium)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium")
    errors: list[str] = []
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            yield page, errors, requests
        finally:
            browser.close()


def test_report_renders_in_headless_browser(merged):
    with browser_page(merged, 1280) as (page, errors, requests):
        for sid in SECTIONS:
            section = page.locator(f"section#{sid}")
            assert section.count() == 1, sid
            assert section.is_visible(), sid
            assert section.locator("h2").first.is_visible(), sid
        assert page.title() == "Merged <test>"
        # Laptop width: the page itself must not scroll sideways; wide tables scroll in their own box.
        page.set_viewport_size({"width": 800, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 800
    assert errors == []
    assert requests == [merged.resolve().as_uri()]


def test_merged_report_compares_both_sources(merged):
    html = merged.read_text()
    for name in ("mac-m3", "linux-cpu", "tiny-mtp-q4", "bf16", "q4"):
        assert name in html
    assert 'id="compare-policy"' in html
    assert "Merged &lt;test&gt;" in html  # the title is escaped
    provenance = html[html.index('id="provenance"'):]
    assert "mtpbench run --model tiny-mtp --policy bf16" in provenance
    assert "mtpbench run --model tiny-mtp-q4 --policy q4" in provenance
    assert "2 runs failed" in html


def test_verdicts_shown_when_present(merged):
    section = merged.read_text().split('id="verdicts"')[1].split("</section>")[0]
    assert "pit_ks" in section and "acceptance_z" in section and "residual_from_p" in section
    assert ">rejected<" in section and ">not rejected<" in section
    assert "KS distance" in section
    # Cells benchmarked without a test are listed as such, never silently implied to pass.
    assert "no preservation test" in section


def test_no_verdicts_says_not_tested(single):
    html = single.read_text()
    section = html.split('id="verdicts"')[1].split("</section>")[0]
    assert "No preservation test was run for these results" in section
    assert "mtpbench verify --out DIR" in section
    assert ">not rejected<" not in section and ">rejected<" not in section
    assert 'id="policies"' not in html  # one policy: nothing to compare


def test_failed_only_and_no_steps_do_not_crash(tmp_path):
    d = build_results(tmp_path / "res", Spec(settings=("greedy",), ks=(1,), with_steps=False, seed=5))
    out = render_report([d], tmp_path / "r.html")
    assert "No per-step records" in out.read_text()
    # Every run failed: the report still renders and says so.
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    runs = pq.read_table(bad / "runs")
    for f in (bad / "runs").glob("*.parquet"):
        f.unlink()
    n = runs.num_rows
    runs = runs.set_column(runs.schema.get_field_index("status"), "status", pa.array(["error"] * n))
    pq.write_table(runs, bad / "runs" / "part-all.parquet")
    html = render_report([bad], tmp_path / "bad.html").read_text()
    assert f"{n} runs failed" in html
    assert all(f'id="{s}"' in html for s in SECTIONS if s != "compare-policy")


def test_report_package_never_imports_mlx_or_the_decoder():
    """Reports must run wherever parquet can be read (DESIGN.md: report -> stats/results only)."""
    import ast

    from mtpbench import report

    banned = ("mlx", "mlx_lm", "click", "mtpbench.decode", "mtpbench.checkpoint", "mtpbench.cli")
    for path in Path(report.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("mtpbench." if node.level else "") + (node.module or "")]
                names = [n.replace("mtpbench.", "mtpbench.report.", 1) if node.level == 1 else n for n in names]
            else:
                continue
            for name in names:
                assert not name.startswith(banned), f"{path.name} imports {name}"
