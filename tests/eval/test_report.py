"""Report on two tiny runs: Markdown + self-contained HTML, every referenced image exists."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from evalhelpers import make_masked_set, make_run, make_tree

from tokenlab.eval.report import write_report
from tokenlab.eval.robustness import evaluate_classifier_run
from tokenlab.eval.tokens import analyze_run
from tokenlab.eval.visualize import save_token_pictures


@pytest.mark.slow
def test_report_on_two_tiny_runs(tmp_path: Path):
    data = make_masked_set(tmp_path / "synth")
    make_tree(data / "rendition", classes=("dog",), per_class=2)
    runs = [make_run(tmp_path / "baseline", token=False), make_run(tmp_path / "stl", seed=1)]
    corr = dict(corruptions="contrast,fog", severities="1,2", cache_dir=tmp_path / "c", workers=0, progress=False)
    evaluate_classifier_run(runs[0], data, **corr)
    evaluate_classifier_run(runs[1], data, reference=runs[0], **corr)
    for r in runs:
        save_token_pictures(analyze_run(r, data, num_examples=2), r)
    files = write_report(runs, tmp_path / "report")
    md = files.markdown.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == len(files.images) >= 7  # bars, severity, reliability, 2x2 token pictures, training
    for ref in refs:
        assert (files.markdown.parent / ref).is_file(), ref
    assert "| baseline |" in md and "| stl |" in md and "## Token labels" in md and "rendition" in md
    page = files.html.read_text()
    assert "images/" not in page.split("<body>")[1].replace("images/png", "")  # nothing points outside the file
    blobs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(blobs) == len(refs)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in blobs)
    assert "<table>" in page


def test_report_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="no run directory"):
        write_report([], tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report([tmp_path / "missing"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report([tmp_path / "empty"], tmp_path / "r")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report([tmp_path / "bad"], tmp_path / "r")
