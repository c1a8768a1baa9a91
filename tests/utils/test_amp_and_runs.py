"""The one autocast vocabulary and the one reader of an exported model's metadata."""

import json
from pathlib import Path

import pytest
import torch

from tokenlab.utils.amp import AMP_CHOICES, amp_dtype, autocast
from tokenlab.utils.runs import export_stem, read_model_meta


def test_amp_names_map_to_dtypes_and_errors_name_the_choices() -> None:
    assert AMP_CHOICES == ("none", "bf16", "fp16")
    assert amp_dtype("none") is None and amp_dtype(None) is None
    assert amp_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown amp 'fp32'; valid: none, bf16, fp16"):
        amp_dtype("fp32")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        amp_dtype("fp16", "cpu")


def test_autocast_runs_matmul_in_bf16_on_cpu_and_none_is_full_precision() -> None:
    a = torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype is torch.bfloat16
    with autocast("cpu", torch.bfloat16):
        assert (a @ a).dtype is torch.bfloat16
    with autocast("cpu", "none"):
        assert (a @ a).dtype is torch.float32


def test_export_stem_and_model_meta(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert export_stem(run) == run / "model"
    assert export_stem(run / "model.safetensors") == run / "model"
    with pytest.raises(FileNotFoundError, match="no exported model"):
        read_model_meta(run)
    (run / "model.json").write_text(json.dumps({"model": "fan_nano_6_p16_224", "img_size": 32}))
    assert read_model_meta(run)["img_size"] == 32
    assert read_model_meta(run / "model.json") == read_model_meta(run / "model")
    (run / "model.json").write_text("{broken")
    with pytest.raises(ValueError, match="model.json is not valid JSON"):
        read_model_meta(run)


def test_fast_path_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenlab.utils import amp as amp_mod
    from tokenlab.utils.amp import FastPath, native_bf16, resolve_fast

    assert native_bf16("meta") is False

    monkeypatch.setattr(amp_mod, "native_bf16", lambda device: False)  # an AVX2-only CPU, like this one
    assert resolve_fast("auto", "cpu") == FastPath("none", False, False, fused_optimizer=True)
    assert resolve_fast("on", "cpu") == FastPath("none", False, True, fused_optimizer=True)
    assert resolve_fast("off", "cpu", "bf16", True, True) == FastPath("bf16", True, True)
    monkeypatch.setattr(amp_mod, "native_bf16", lambda device: True)  # AMX / AVX512-BF16 CPU or a bf16 GPU
    assert resolve_fast("auto", "cpu") == FastPath("bf16", False, False, fused_optimizer=True)
    assert resolve_fast("auto", "cuda") == FastPath("bf16", True, False, fused_optimizer=True)
    assert resolve_fast("auto", "cuda", fsdp=True).channels_last is False  # FSDP2 needs contiguous weights
    assert resolve_fast("auto", "cuda", fsdp=True).fused_optimizer is False  # nor fused kernels over DTensors
    assert resolve_fast("auto", "cuda", "fp16").amp == "fp16"  # an explicit choice stays
    assert resolve_fast("off", "cpu") == FastPath("none", False, False)
    with pytest.raises(ValueError, match="'train.fast' is 'yes'; valid: auto, on, off"):
        resolve_fast("yes", "cpu")
