"""Malformed recipes and overrides: one ValueError naming the file or override, the key and the problem (issue 16).

Through the CLI each becomes one ``error:`` line with exit status 2 instead of a YAML / OmegaConf traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenlab.cli import main
from tokenlab.engine.config import load_config


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model:\n  name: [unclosed\n", r"is not valid YAML: did not find expected ',' or '\]' at line 3"),
        ("model:\n\tname: x\n", "is not valid YAML: found character that cannot start any token at line 2, column 1"),
        ("model: [1, 2]\n", r"config key 'model' in .*bad.yaml must be a section .*got \[1, 2\]"),
        ("optim: 3\n", r"config key 'optim' in .*bad.yaml must be a section .*got 3"),
        ("data:\n  transform: [a]\n", r"config key 'data.transform' in .*bad.yaml must be a section"),
        ("- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_a_malformed_recipe_names_the_file_and_the_problem(tmp_path: Path, text: str, match: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_config(recipe)
    assert str(recipe) in str(info.value)


def test_a_binary_recipe_is_named(tmp_path: Path) -> None:
    recipe = tmp_path / "binary.yaml"
    recipe.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ValueError, match=f"recipe {recipe} is not valid YAML"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.name=[1,", r"cannot parse override 'model.name=\[1,': did not find expected node content$"),
        ("model=[1,2]", r"config key 'model' in the command-line overrides must be a section .*got \[1, 2\]"),
        ("optim=3", r"config key 'optim' in the command-line overrides must be a section"),
        ("model.kwargs=null", r"config key 'model.kwargs' .* must be a section .*got None"),
        ("data.transform.bogus=1", r"config section 'data.transform' .*'bogus': 1.* unexpected keyword .*'bogus'"),
        ("data.transform.scale=5", r"config section 'data.transform' .*does not fit method 'supervised'"),
        ("data.dataset.bogus=1", r"unknown key\(s\) \['bogus'\] in config section 'data.dataset'; valid: "),
        ("train.ema.bogus=1", r"bad config key 'train.ema.bogus'"),
    ],
)
def test_a_malformed_override_names_it(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config("synthetic_fan_baseline", [override])


@pytest.mark.parametrize(
    ("recipe", "view"), [("ibot_synthetic_vit_tiny", "multicrop"), ("seg_synthetic", "segmentation")]
)
def test_unknown_transform_keys_are_refused_for_every_data_view(recipe: str, view: str) -> None:
    with pytest.raises(ValueError, match=rf"data view '{view}'.*unexpected keyword argument 'bogus'"):
        load_config(recipe, ["data.transform.bogus=1"])


def test_the_cli_prints_one_error_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: [1, 2]\n")
    for argv in (
        ["train", "--config", str(recipe), "--print-config"],
        ["train", "--config", "synthetic_fan_baseline", "--print-config", "model.name=[1,"],
        ["train", "--config", "synthetic_fan_baseline", "--print-config", "data.transform.bogus=1"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
