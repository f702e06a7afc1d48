"""The HTML report as a reader meets it: opened in headless Chromium (issue 6, quality)."""

from __future__ import annotations

import pytest

from prunestudy import browser

pytestmark = pytest.mark.skipif(
    browser.chromium_path() is None,
    reason="no Chromium on this machine: `make setup` installs Debian's chromium package (as root)")


@pytest.mark.e2e
def test_report_opens_cleanly_offline_with_summary_on_the_first_screen(smoke_run):
    run_dir, _ = smoke_run
    shot = run_dir / "report.png"
    found = browser.inspect(run_dir / "report.html", screenshot=shot)
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["dialogs"] == []
    assert found["failed_requests"] == [] and found["external_requests"] == []
    assert len(found["images"]) >= 6 and found["broken_images"] == []
    assert all(i["w"] > 100 and i["h"] > 100 for i in found["images"])
    assert found["first_screen_visible"], found["first_screen_box"]
    assert "test accuracy" in found["text"] and "seed report" in found["text"]
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("name", ["01_data", "02_train", "03_prune", "04_retrain", "05_analysis"])
@pytest.mark.e2e
def test_each_stage_page_opens_cleanly_offline(smoke_run, name):
    run_dir, _ = smoke_run
    found = browser.inspect(run_dir / "notebooks" / f"{name}.html", first_screen="body")
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["dialogs"] == []
    assert found["failed_requests"] == [] and found["external_requests"] == []
    assert found["broken_images"] == []


@pytest.mark.e2e
def test_hostile_names_run_nothing_in_the_browser(coco_run):
    """Category names and a run folder holding <script> and <img onerror>: shown as text, never run."""
    from conftest import HOSTILE

    run_dir, _, _ = coco_run
    for page in [run_dir / "report.html", *sorted((run_dir / "notebooks").glob("*.html"))]:
        found = browser.inspect(page, first_screen="body")
        assert found["dialogs"] == [] and found["page_errors"] == [], page.name
        assert found["failed_requests"] == [] and found["external_requests"] == [], page.name
        assert found["broken_images"] == [], page.name  # an injected <img src=x> would be one
        if page.name in ("report.html", "01_data.html"):
            assert all(name in found["text"] for name in HOSTILE.values()), page.name  # readable as text


def _first_screen(run_dir, name="report.html"):
    """What a reader meets at 1366x768: the verdict's box on the first screen, and the tables too wide."""
    return browser.inspect(run_dir / name, first_screen="text=Verdict.")


@pytest.mark.e2e
def test_the_verdict_is_on_the_first_screen_and_no_table_is_wider_than_the_page(smoke_run):
    found = _first_screen(smoke_run[0])
    assert found["first_screen_visible"], found["first_screen_box"]
    assert found["first_screen_box"]["y"] < 250   # first, above the table
    assert found["wide_tables"] == []
    assert "No sweep in this run" not in found["text"]   # no section for what the run did not compute
    assert len(found["first_screen_text"].split()) < 450   # 541 before the verdict (issue 32)


@pytest.mark.e2e
def test_the_verdict_on_real_photos_at_the_floor_says_it_once(coco_run):
    found = _first_screen(coco_run[0])
    assert found["first_screen_visible"] and found["wide_tables"] == []
    assert found["first_screen_text"].count("Nothing can be concluded") == 1


@pytest.mark.e2e
def test_every_figure_has_its_caption_as_alt_text(smoke_run):
    html = (smoke_run[0] / "report.html").read_text()
    assert "No description has been provided" not in html and 'alt="Test accuracy' in html
