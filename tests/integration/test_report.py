"""`halluscope report` writes one self-contained report.html, checked in a real headless browser.

The browser is Debian's Chromium (`apt-get install chromium`), driven by playwright's Python package through
`executable_path`; nothing is downloaded at run time. The browser tests skip, with the reason, where either is
missing; .ci/run installs both, so they run in CI.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

#: Flags that let Chromium run headless as root in a container without reaching for the network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECTIONS = ["rates", "heads", "maps", "shifts", "comparison", "manifest"]
PLOTS = ["rates-by-condition", "rates-by-truth", "heads-heatmap", "attention-maps", "attention-mass", "probabilities"]


def _chromium() -> str | None:
    """Debian's Chromium, or the one $HALLUSCOPE_CHROMIUM names."""
    return os.environ.get("HALLUSCOPE_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def report(demo_run) -> Path:
    """The demo run's report.html, rewritten by `halluscope report`."""
    run, _ = demo_run
    (run / "report.html").unlink()
    from halluscope.cli import main

    main(["report", "--run", str(run)])
    return run / "report.html"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium to drive: apt-get install chromium (lifted where /usr/bin/chromium exists, as in CI)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@dataclass
class Opened:
    """The report in a browser tab, with what went wrong while it loaded."""

    page: Any
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    outside: list[str] = field(default_factory=list)  # requests for anything but the file itself


@pytest.fixture
def opened(browser, report) -> Iterator[Opened]:
    """The report opened from disk, every request that is not the file itself refused and recorded."""
    tab = Opened(browser.new_page(viewport={"width": 1300, "height": 900}))
    tab.page.on("console", lambda message: message.type == "error" and tab.errors.append(message.text))
    tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))

    def only_the_file(route) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            tab.outside.append(route.request.url)
            route.abort()

    tab.page.route("**/*", only_the_file)
    tab.page.goto(report.as_uri())
    for div in PLOTS:  # plotly has drawn each figure
        tab.page.wait_for_selector(f"#{div} .main-svg", timeout=30_000)
    yield tab
    tab.page.close()


def test_report_command_writes_a_self_contained_page(report, demo_run):
    run, _ = demo_run
    text = report.read_text(encoding="utf-8")
    assert "<script src" not in text and "<link" not in text  # plotly.js embedded, no CDN
    assert all(f'id="{div}"' in text for div in PLOTS)
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert steps["report"]["status"] == "finished" and steps["report"]["outputs"] == ["report.html"]


def test_page_loads_offline_and_every_section_renders(opened, tmp_path):
    page = opened.page
    assert opened.errors == [] and opened.outside == []
    for section in SECTIONS:
        body = page.locator(f"section#{section}")
        assert body.is_visible(), section
        assert body.locator(".main-svg, table").count() > 0, f"section {section} drew nothing"
    assert page.locator(".absent").count() == 0  # the demo ran every step a section needs
    assert page.locator("#manifest").inner_text().count("finished") >= 9
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_hovering_a_head_shows_its_rate_rank_and_flipped_prompts(opened, demo_run, tmp_path):
    run, _ = demo_run
    page = opened.page
    ranking = pd.read_parquet(run / "ranking.parquet")
    best = {k: int(v) for k, v in ranking.sort_values(["rank", "layer", "head"]).iloc[0].items()
            if k in ("layer", "head", "n", "rank")}
    model = json.loads((run / "manifest.json").read_text())["model"]
    heatmap = page.locator("#heads-heatmap")
    heatmap.scroll_into_view_if_needed()
    area = heatmap.locator(".nsewdrag").first.bounding_box()
    x = area["x"] + (best["head"] + 0.5) / model["n_heads"] * area["width"]
    y = area["y"] + (best["layer"] + 0.5) / model["n_layers"] * area["height"]  # layer 0 at the top
    page.mouse.move(x, y)
    tooltip = heatmap.locator(".hoverlayer .hovertext")
    tooltip.wait_for(timeout=10_000)
    text = tooltip.text_content()  # SVG: text_content, not inner_text
    assert f"L{best['layer']}H{best['head']}" in text and "rank 1" in text and f"n = {best['n']}" in text
    assert "before:" in text and "after:" in text  # the best head changed some prompt's answer
    heatmap.screenshot(path=tmp_path / "heatmap-tooltip.png")
    assert opened.errors == []


def test_attention_maps_switch_sample(opened, tmp_path):
    page = opened.page
    maps = page.locator("#attention-maps")
    maps.scroll_into_view_if_needed()
    header = maps.locator(".updatemenu-header")
    first = header.text_content()
    header.click()
    options = maps.locator(".updatemenu-dropdown-button")
    assert options.count() >= 2
    second = options.nth(1).text_content()
    titles_before = maps.locator(".annotation-text").all_text_contents()
    options.nth(1).click()
    page.wait_for_function("(t) => document.querySelector('#attention-maps .updatemenu-header').textContent !== t",
                           arg=first)
    assert header.text_content() == second != first
    assert maps.locator(".annotation-text").all_text_contents() != titles_before  # each head's share is the sample's
    maps.screenshot(path=tmp_path / "attention-maps.png")
    assert opened.errors == []
