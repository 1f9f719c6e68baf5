"""`explain --report`: one self-contained HTML page per run, opened in a real headless browser (Debian's
chromium; the browser test skips only where it is absent, and .ci/run installs it)."""

import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from onnx_saliency.cli.main import main
from tests.graphs import tiny_classifier

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    model = tiny_classifier(tmp / "tiny.onnx")
    folder = tmp / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(2):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    (folder / "broken.png").write_text("not an image")
    out = tmp / "out"
    result = CliRunner().invoke(main, ["explain", str(model), str(folder), "-m", "gradcam", "-m", "lrp",
                                       "--out", str(out), "--report", "-q"], catch_exceptions=False)
    assert result.exit_code == 1, result.output  # the broken image is reported and skipped
    return out, result.output


def test_report_page_is_self_contained_and_complete(run):
    out, text = run
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"report  {out / 'report.html'}" in text
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", page)  # nothing fetched from anywhere
    assert "<script" not in page and "http://" not in page and "https://" not in page
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,", page)
    assert sorted(images) == sorted(["input", "gradcam", "lrp"] * 2)
    assert page.count("class='conservation'") == 2  # one LRP table per image
    # the default composite zeroes the conv biases; the first layer is flat (no bias); the sink column says so
    assert "<td>stabiliser (bias zeroed)</td>" in page and "<td>stabiliser (no bias in the rule)</td>" in page
    assert "broken.png" in page and "error:" in page  # the failure is on the page too
    assert len(re.findall(r"</b>: target \S+ \(\d+\), score [-0-9.e]+", page)) == 4  # every image x method
    for name in ("sha256", "preprocessing", "clip percentile 99.5", "execution provider", "onnxruntime"):
        assert name in page


def test_conservation_table_printed_and_on_the_page_agree(run):
    out, text = run
    printed = [line.split("\t") for line in text.splitlines() if line.startswith("conservation  ")
               and "\t" in line and "sum R out" not in line]
    assert printed, text
    first = printed[0]
    node, out_sum, in_sum = first[0].split("  ", 1)[1], float(first[3]), float(first[4])
    page = (out / "report.html").read_text(encoding="utf-8")
    row = re.search(rf"<tr[^>]*><td>{re.escape(node)}</td><td>[^<]*</td><td>[^<]*</td><td class='num'>([^<]+)</td>"
                    rf"<td class='num'>([^<]+)</td>", page)
    assert row and float(row.group(1)) == pytest.approx(out_sum, rel=1e-5)
    assert float(row.group(2)) == pytest.approx(in_sum, rel=1e-5)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    out, _ = run
    page = (out / "report.html").read_text(encoding="utf-8")
    # a copy that counts, after load, the pictures the browser decoded (the page itself has no script)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load',()=>{document.body.dataset"
                                  ".decoded=[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
                                  "});</script></body>"), encoding="utf-8")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-decoded="6"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1800", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    rgb = cv2.imread(str(shot), cv2.IMREAD_COLOR)[:, :, ::-1].astype(int)
    assert rgb.shape == (1800, 1200, 3)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)       # LRP's positive relevance
    jet_blue = (rgb[..., 2] > 120) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)  # the Grad-CAM overlay / colour bars
    assert red.sum() > 500 and jet_blue.sum() > 200, (red.sum(), jet_blue.sum())
    assert (rgb.sum(axis=2) < 700).mean() > 0.05  # text, tables and pictures, not a blank page
