import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT.parent / "shared" / "coco-sample"


@pytest.fixture(autouse=True)
def _project_home(monkeypatch):
    """Relative paths in parameters resolve against the checkout, whatever the cwd."""
    monkeypatch.setenv("PRUNESTUDY_HOME", str(ROOT))


@pytest.fixture
def coco_sample() -> Path:
    if not (COCO_SAMPLE / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_SAMPLE} (CI provides ../shared/coco-sample)")
    return COCO_SAMPLE
