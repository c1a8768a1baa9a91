"""ImageNet-C numbers as published: accuracy over every corruption folder present, mCE over the 15 benchmark ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalhelpers import make_run, make_tree

from tokenlab.eval.robustness import evaluate_classifier_run


def test_accuracy_averages_all_folders_and_mce_only_the_benchmark_ones(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_tree(data, per_class=2)
    tree = tmp_path / "inc"
    for corruption in ("fog", "spatter"):  # one of the 15 benchmark corruptions, one of the 4 extra ones
        for severity in ("1", "2"):
            make_tree(tree / corruption / severity, per_class=2)
    reference = make_run(tmp_path / "ref", token=False)
    evaluate_classifier_run(reference, data, corruption_tree=tree, workers=0, ood=None)
    run = make_run(tmp_path / "run", token=False, seed=1)
    evaluate_classifier_run(run, data, corruption_tree=tree, reference=reference, workers=0, ood=None)
    corr = json.loads((run / "eval.json").read_text())["corruptions"]["official"]
    acc = {c: [corr["accuracy"][c][s] for s in ("1", "2")] for c in ("fog", "spatter")}
    assert corr["robust_accuracy_over"] == ["fog", "spatter"]
    assert corr["robust_accuracy"] == pytest.approx(sum(acc["fog"] + acc["spatter"]) / 4)
    assert corr["robust_accuracy_common_over"] == ["fog"]
    assert corr["robust_accuracy_common"] == pytest.approx(sum(acc["fog"]) / 2)
    # the reference run has both corruptions, but mCE is defined over the benchmark ones only
    assert corr["mce_over"] == ["fog"] and set(corr["ce"]) == {"fog"}
    ref = json.loads((reference / "eval.json").read_text())["corruptions"]["official"]
    ref_err = sum(1 - a for a in ref["accuracy"]["fog"].values())  # > 0 for these fixed seeds
    assert corr["mce"] == pytest.approx(sum(1 - a for a in acc["fog"]) / ref_err)
