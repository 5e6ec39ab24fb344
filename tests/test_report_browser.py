"""The report renders in headless Chromium: a screenshot with real content, images decoded."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from lorakit.report import write_report, write_sweep_table
from test_report import build_classification_run, build_sweep

CHROMIUM = Path("/usr/bin/chromium")
# Reports the decoded size of every image into the DOM once the page (images included) has loaded.
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  document.body.setAttribute("data-image-sizes", JSON.stringify(sizes));
});
</script>"""


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `bash scripts/install-system-deps.sh` "
            "(installs Debian's chromium) before the tests"
        )
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(build_classification_run(tmp_path_factory.mktemp("browser") / "run"))


def render(page: Path, tmp_path: Path) -> tuple[np.ndarray, list[list]]:
    """Open `page` in headless Chromium: its screenshot, and for each image on it
    (complete, naturalWidth, naturalHeight) as the browser decoded it."""
    probe = tmp_path / page.name
    probe.write_text(page.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    png = tmp_path / "screenshot.png"
    dom = chromium(
        f"--screenshot={png}",
        "--window-size=1280,2000",
        "--dump-dom",
        "--virtual-time-budget=5000",
        probe.resolve().as_uri(),
        profile=tmp_path / "profile",
    ).stdout
    assert png.is_file(), "chromium wrote no screenshot"
    found = re.search(r'data-image-sizes="([^"]*)"', dom)
    assert found, "the page's load event never ran (no data-image-sizes in the dumped DOM)"
    return imread(png)[..., :3], json.loads(found.group(1).replace("&quot;", '"'))


def assert_not_blank(pixels: np.ndarray) -> None:
    """Many distinct colours, and a good share of pixels unlike both white and the page's
    background (the most common colour)."""
    assert pixels.shape[:2] == (2000, 1280)
    flat = (pixels * 255).astype(np.int16).reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    assert len(colours) > 300, f"only {len(colours)} distinct colours: a blank page?"
    background = colours[counts.argmax()]
    distance_to_background = np.abs(flat - background).max(axis=1)
    distance_to_white = np.abs(flat - 255).max(axis=1)
    content = ((distance_to_background > 24) & (distance_to_white > 24)).mean()
    assert content > 0.015, f"only {100 * content:.1f}% of the screenshot is content"


def test_run_report_renders_with_its_images(report: Path, tmp_path: Path) -> None:
    pixels, sizes = render(report, tmp_path)
    assert_not_blank(pixels)
    assert len(sizes) == report.read_text().count("<img ") == 2
    for complete, width, height in sizes:
        assert complete and width > 300 and height > 300, sizes


def test_sweep_report_renders_with_its_images(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    write_sweep_table(sweep_dir, build_sweep(sweep_dir, ranks=(0, 1, 2), alphas=(8.0,)))
    report = write_report(sweep_dir)
    pixels, sizes = render(report, tmp_path)
    assert_not_blank(pixels)
    # the metric against r and against alpha, and the quality-against-cost panel
    assert len(sizes) == report.read_text().count("<img ") == 3, sizes
    assert all(c and w > 300 and h > 200 for c, w, h in sizes), sizes
