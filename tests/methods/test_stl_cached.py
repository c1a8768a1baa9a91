"""STL student trained from a label store (cached token labels) against the online labeler."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

import tokenlab  # noqa: F401  (registers the FAN models)
from tokenlab.data.label_store import LabelStore, compress_logits
from tokenlab.data.transforms import view_affine
from tokenlab.losses.stl_token import make_token_labels
from tokenlab.methods import StepContext, TrainPlan, build_method

KW = dict(img_size=16, embed_dim=32, depth=1, num_heads=2)
K = 12


def _token_model(k: int = K) -> nn.Module:
    return timm.create_model("fan_nano_6_p16_224_token", num_classes=k, patch_size=4, **KW).eval()


def _labeler() -> nn.Module:
    """A labeler whose token logits are spread apart (an untrained head gives near-ties that fp16 may swap)."""
    model = _token_model()
    with torch.no_grad():
        model.get_submodule("aux_head").weight.mul_(50)
    return model


def _store(tmp_path, labeler: nn.Module, images: torch.Tensor, k: int = 5):
    """A label store of ``labeler`` on ``images`` (full views), written as ``tokenlab labels build`` does."""
    n = images.shape[0]
    with torch.inference_mode():
        out = labeler.forward_tokens(images)
    values, indices, rest = compress_logits(out.token_logits, k)
    manifest = {
        "labeler": {"model": "fan", "path": None, "export": "module", "sha256": None},
        "data": {"spec": "test", "split": "train", "num_images": n, "sha256": "0" * 64},
        "img_size": 16, "k": k, "grid": list(out.grid), "views": 1, "num_classes": K,
        "mean": [0.5] * 3, "std": [0.5] * 3, "seed": 0,
    }  # fmt: skip
    store = LabelStore.create(tmp_path / "store", manifest, [f"{i}.png" for i in range(n)])
    theta = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(n, 1, 2, 3)
    store.write_rows(np.arange(n), values[:, None], indices[:, None], rest[:, None], theta)
    assert store.finish()
    return tmp_path / "store", out


def _ctx() -> StepContext:
    return StepContext(step=0, epoch=0, plan=TrainPlan(10, 10, 1), device=torch.device("cpu"))


def test_cached_targets_on_the_full_view_equal_the_online_targets(tmp_path):
    labeler = _labeler()
    images = torch.randn(4, 3, 16, 16)
    store, online = _store(tmp_path, labeler, images)
    cached = build_method("stl_student", model=_token_model(), label_store=str(store), label_type="argmax")
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3)
    t = cached.cached_logits({"index": torch.arange(4), "view_theta": identity}, online.grid)
    assert torch.equal(t.topk(5, -1).indices, online.token_logits.topk(5, -1).indices)
    assert torch.allclose(t.topk(5, -1).values, online.token_logits.topk(5, -1).values, atol=1e-2)
    assert torch.equal(t.argmax(-1), online.token_logits.argmax(-1))
    # the same token-target code: argmax labels equal, Gumbel labels equal under the same noise
    assert torch.equal(make_token_labels(t, "argmax"), make_token_labels(online.token_logits, "argmax"))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    agree = (make_token_labels(t, "gumbel", generator=g1).argmax(-1)
             == make_token_labels(online.token_logits, "gumbel", generator=g2).argmax(-1)).float().mean()  # fmt: skip
    assert agree > 0.9  # differs only where the Gumbel sample falls outside the top-5 or on an fp16 tie


def test_cached_targets_follow_a_flipped_crop(tmp_path):
    labeler = _labeler()
    images = torch.randn(2, 3, 16, 16)
    store, online = _store(tmp_path, labeler, images, k=K)  # all classes stored: exact up to fp16
    method = build_method("stl_student", model=_token_model(), label_store=str(store))
    # the right half of the 16 px image (token columns 2, 3 of 4), flipped, on a 4x2 grid
    theta = view_affine({"box": (0, 8, 16, 8), "flip": True, "geometric": []}, (16, 16), 16)
    t = method.cached_logits({"index": torch.arange(2), "view_theta": theta.expand(2, 2, 3)}, (4, 2))
    maps = online.token_logits.view(2, 4, 4, K)
    expected = maps[:, :, [3, 2]].reshape(2, 8, K)
    assert torch.allclose(t, expected, atol=1e-2)


def test_cached_student_trains_and_records_its_store(tmp_path):
    labeler = _labeler()
    images = torch.randn(4, 3, 16, 16)
    store, _ = _store(tmp_path, labeler, images)
    method = build_method("stl_student", model=_token_model(), label_store=str(store), mixup_alpha=0.8)
    method.train()
    batch = {"image": images, "label": torch.arange(4) % K, "index": torch.tensor([3, 1, 0, 2]),
             "view_theta": torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3)}  # fmt: skip
    out = method.training_step(batch, _ctx())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["token"] > 0
    assert method.export_meta()["labeler"]["label_store"] == str(store)
    assert method.transform_options({"label_store": str(store)}) == {"teacher": "geometry"}
    with pytest.raises(KeyError, match="view_theta"):
        method.training_step({"image": images, "label": batch["label"], "index": batch["index"]}, _ctx())


def test_store_errors(tmp_path):
    labeler = _labeler()
    store, _ = _store(tmp_path, labeler, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="12 classes but the student has 3"):
        build_method("stl_student", model=_token_model(3), label_store=str(store))
    with pytest.raises(ValueError, match="not both"):
        build_method("stl_student", model=_token_model(), label_store=str(store), labeler=labeler)
    with pytest.raises(ValueError, match="teacher_aug='full' does not apply"):
        build_method("stl_student", model=_token_model(), label_store=str(store), teacher_aug="full")
    with pytest.raises(FileNotFoundError, match="not a label store"):
        build_method("stl_student", model=_token_model(), label_store=str(tmp_path / "nothing"))
