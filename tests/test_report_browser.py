"""The report in a real browser: headless Chromium at 1400 x 900 (skipped without Chromium).

Debian's ``chromium`` package provides ``/usr/bin/chromium`` (``apt-get install -y chromium``).
A probe script appended to a copy of the page writes, once the page and its images have loaded,
the document's scroll width, the images' natural widths and whether the matrix is there into
the DOM, which ``--dump-dom`` prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_evaluate import make_run
from test_report import SHIFTED

from pipeline import evaluate, report

WIDTH, HEIGHT = 1400, 900


def _chromium() -> str | None:
    for name in (os.environ.get("SEGCAL_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt install chromium)")

_PROBE = """
<script>
window.addEventListener('load', function () {
  var m = document.getElementById('matrix');
  var out = {
    scrollWidth: document.documentElement.scrollWidth,
    clientWidth: document.documentElement.clientWidth,
    matrixRight: m ? m.getBoundingClientRect().right : null,
    images: Array.prototype.map.call(document.images, function (i) {
      return [i.getAttribute('src'), i.naturalWidth];
    })
  };
  // Sort the summary by its nll column (one click: ascending), as a reader would.
  var table = document.getElementById('summary');
  var heads = Array.prototype.map.call(table.querySelectorAll('thead th'),
                                       function (th) { return th.textContent; });
  var column = heads.indexOf('nll');
  function values() {
    return Array.prototype.map.call(table.querySelectorAll('tbody'), function (tb) {
      return Array.prototype.map.call(tb.querySelectorAll('tr.r'), function (tr) {
        return parseFloat(tr.cells[column].textContent);
      });
    });
  }
  out.unsorted = values();
  table.querySelectorAll('thead th')[column].click();
  out.sorted = values();
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium_args(url: str, *extra: str) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000",
            *extra, url]


def probe(page: Path, extra_html: str = "") -> dict:
    """Load a copy of ``page`` (beside it, so relative images resolve) and read the probe."""
    copy = page.with_name("probe.html")
    copy.write_text(page.read_text().replace("</body>", extra_html + _PROBE + "</body>"))
    try:
        out = subprocess.run(_chromium_args(copy.as_uri(), "--dump-dom"), capture_output=True,
                             text=True, timeout=120, check=True).stdout
    finally:
        copy.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', out, re.S)
    assert found, f"Expected the probe's output in the DOM, but got {out[-500:]!r}"
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    cfg, _ = make_run(tmp_path_factory.mktemp("browser"), SHIFTED)
    evaluate.run(cfg, local=True)
    return report.write(cfg)


def test_report_fits_1400px_and_shows_the_matrix_and_the_plots(page):
    seen = probe(page)
    assert seen["clientWidth"] == WIDTH
    assert seen["scrollWidth"] <= WIDTH  # no horizontal scrolling
    assert seen["matrixRight"] is not None
    assert seen["matrixRight"] <= WIDTH
    images = dict(seen["images"])
    assert images["plots/shift-fog.png"] > 0  # loaded, not a broken image
    assert all(width > 0 for width in images.values())
    assert set(images) >= {"plots/shift-fog.png", "plots/day.png", "plots/cal-heldout.png"}


def test_clicking_a_header_sorts_each_dataset_group(page):
    seen = probe(page)
    groups = seen["sorted"]
    assert len(groups) == 4  # cal-heldout, day, fog-1, fog-3
    assert groups != seen["unsorted"]  # the click changed an order
    for values in groups:
        assert len(values) == 2
        assert values == sorted(values)


def test_the_probe_sees_an_overflow(page):
    # The check above is only worth something if an over-wide page is caught.
    seen = probe(page, '<div style="width:3000px">wide</div>')
    assert seen["scrollWidth"] > WIDTH

