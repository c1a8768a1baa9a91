"""`tokenlab tokens` on a plain class-tree folder without masks: maps, pictures and mask-free statistics."""

from __future__ import annotations

import json
from pathlib import Path

from evalhelpers import make_masked_set, make_run, make_tree

from tokenlab.cli import main


def test_tokens_on_a_folder_without_masks(tmp_path: Path, capsys) -> None:
    tree = make_tree(tmp_path / "imgs", per_class=3)
    stl, plain = make_run(tmp_path / "stl"), make_run(tmp_path / "plain", token=False, seed=1)
    assert main(["tokens", str(stl), str(plain), "--data", str(tree), "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "no object masks" in out and "tok=img" in out and "fg acc" not in out
    assert "stl" in out and "plain" in out
    for run, source in ((stl, "aux"), (plain, "head")):
        rec = json.loads((run / "tokens.json").read_text())
        assert rec["masks"] is False and rec["source"] == source and rec["images"] == 6
        assert rec["tokens"] == 6 * 64 and "fg_accuracy" not in rec and "iou" not in rec
        assert (run / "token_labels.png").stat().st_size > 0 and (run / "class_attention.png").stat().st_size > 0
    # the report takes the mask-free records: the all-token columns filled, the mask-based ones empty
    assert main(["report", str(stl), str(plain), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rec = json.loads((stl / "tokens.json").read_text())
    row = next(ln for ln in md.splitlines() if ln.startswith("| stl | aux |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{100 * rec['agree_with_image_label']:.1f}" and cells[3] == f"{100 * rec['confidence']:.1f}"
    assert cells[4:9] == ["–"] * 5


def test_tokens_with_masks_keeps_the_mask_table(tmp_path: Path, capsys) -> None:
    data = make_masked_set(tmp_path / "synth")
    run = make_run(tmp_path / "run")
    assert main(["tokens", str(run), "--data", str(data), "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert "fg acc" in out and "IoU" in out and "no object masks" not in out
    rec = json.loads((run / "tokens.json").read_text())
    assert rec["masks"] is True and {"fg_accuracy", "iou", "bg_distribution", "threshold"} <= set(rec)
