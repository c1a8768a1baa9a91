"""The label store: top-k compression, dense reconstruction, view geometry, resumable writing and bad stores."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from tokenlab.data.label_store import (
    LabelStore,
    StoredCrops,
    StoreViews,
    compress_logits,
    crop_from_theta,
    crop_token_map,
    data_identity,
    dense_logits,
    select_views,
)
from tokenlab.data.transforms import Op, ViewTransform, build_transforms, view_affine


def test_top_k_and_full_softmax_argmax_survive_the_round_trip():
    logits = torch.randn(6, 49, 100) * 3
    values, indices, rest = compress_logits(logits, 5)
    dense = dense_logits(values.half(), indices, rest.half(), 100)
    top = logits.topk(5, dim=-1)
    assert torch.equal(dense.topk(5, dim=-1).indices, top.indices)
    assert torch.equal(dense.argmax(-1), logits.argmax(-1))
    # the top-k classes keep their full-softmax probability, the rest share the remaining mass
    p_dense, p_full = dense.softmax(-1), logits.softmax(-1)
    assert torch.allclose(p_dense.gather(-1, top.indices), p_full.gather(-1, top.indices), atol=2e-3)
    assert torch.allclose(p_dense.sum(-1), torch.ones(6, 49), atol=1e-5)
    # every missing class stays below the k-th
    assert (
        dense.scatter(-1, top.indices, float("-inf")).amax(-1) <= dense.gather(-1, top.indices[..., -1:])[..., 0]
    ).all()


def test_top_k_equal_to_the_class_count_is_exact():
    logits = torch.randn(2, 4, 3)
    dense = dense_logits(*compress_logits(logits, 3), 3)
    assert torch.allclose(dense, logits)


def test_crop_and_flip_on_a_hand_made_map():
    # an 8x8 source image covered by a 4x4 token map, token (r, c) = 10 r + c
    grid = (torch.arange(4).view(4, 1) * 10 + torch.arange(4).view(1, 4)).float()
    dense = grid.view(1, 1, 4, 4)
    # the right half (columns 4-7 of the image = token columns 2, 3), flipped, onto a 4x2 token grid
    theta = view_affine({"box": (0, 4, 8, 4), "flip": True, "geometric": []}, (8, 8), 8)
    out = crop_token_map(dense, theta[None], (4, 2)).view(4, 2)
    assert torch.equal(out, torch.tensor([[3.0, 2], [13, 12], [23, 22], [33, 32]]))
    # unflipped bottom-left quarter onto 2x2 tokens
    theta = view_affine({"box": (4, 0, 4, 4), "flip": False, "geometric": []}, (8, 8), 8)
    out = crop_token_map(dense, theta[None], (2, 2)).view(2, 2)
    assert torch.equal(out, torch.tensor([[20.0, 21], [30, 31]]))
    # the full view is the identity
    full = view_affine({"box": (0, 0, 8, 8), "flip": False, "geometric": []}, (8, 8), 8)
    assert torch.allclose(full, torch.tensor([[1.0, 0, 0], [0, 1, 0]]), atol=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        {"box": (5, 7, 50, 60), "flip": True, "geometric": [Op("Rotate", 20.0)]},
        {"box": (5, 7, 50, 60), "flip": False, "geometric": [Op("ShearX", 10.0), Op("TranslateYRel", 4.0)]},
    ],
)
def test_view_affine_follows_the_transform_geometry(params):
    """Cutting a coordinate image with ``view_affine`` gives what the view's own geometry gives (up to nearest)."""
    H, W, S = 60, 90, 32
    ys, xs = torch.meshgrid((torch.arange(H) + 0.5) / H * 2 - 1, (torch.arange(W) + 0.5) / W * 2 - 1, indexing="ij")
    src = torch.stack([xs, ys, torch.zeros_like(xs)])
    out = ViewTransform(S, teacher="geometry").transform(tv_tensors.Image(src.clone()), params)
    ref = crop_token_map(src[None], view_affine(params, (H, W), S)[None], (S, S))[0].T.reshape(3, S, S)
    valid = out[2, 6:-6, 6:-6] == 0  # not the fill of the rotation / shear
    err = (out[:2, 6:-6, 6:-6] - ref[:2, 6:-6, 6:-6]).abs()[:, valid]
    assert err.max() < 1.5 * 2 * 60 / 32 / 60  # within 1.5 view pixels (nearest sampling of the ops)


def test_geometry_view_gives_theta_and_no_teacher_image():
    tf = build_transforms("stl_paired", 16, teacher="geometry")
    out = tf({"image": tv_tensors.Image(torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8)), "index": 3})
    assert "teacher_image" not in out and out["view_theta"].shape == (2, 3) and out["index"] == 3


def test_select_views_takes_the_smallest_stored_view_holding_the_student():
    full = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    half = torch.tensor([[0.5, 0, 0.5], [0, 1, 0]])  # the right half of the image
    stored = torch.stack([full, half])[None].repeat(2, 1, 1, 1)
    student = torch.stack([torch.tensor([[0.25, 0, 0.6], [0, 0.5, 0]]), torch.tensor([[0.25, 0, -0.5], [0, 0.5, 0]])])
    view, theta = select_views(stored, student)
    assert view.tolist() == [1, 0]
    # the student's affine inside the chosen view composes back to the student's affine on the image
    assert torch.allclose(half[:, :2] @ theta[0][:, :2], student[0][:, :2])
    assert torch.allclose(theta[1], student[1])


def test_select_views_prefers_a_view_of_the_students_orientation():
    """A flipped student crop takes the mirrored full view over the unflipped full view and over a smaller unflipped
    crop that holds it; an unflipped student keeps the smallest unflipped view."""
    full = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    mirrored = torch.tensor([[-1.0, 0, 0], [0, 1, 0]])
    half = torch.tensor([[0.5, 0, 0.5], [0, 1, 0]])  # the right half of the image, unflipped
    stored = torch.stack([full, mirrored, half])[None].repeat(3, 1, 1, 1)
    flipped_student = torch.tensor([[-0.25, 0, 0.6], [0, 0.5, 0]])  # inside the right half, mirrored
    plain_student = torch.tensor([[0.25, 0, 0.6], [0, 0.5, 0]])
    rotated_out = torch.tensor([[-0.8, 0.7, 0.0], [0.7, 0.8, 0.0]])  # mirrored, corners outside the image
    view, theta = select_views(stored, torch.stack([flipped_student, plain_student, rotated_out]))
    assert view.tolist() == [1, 2, 1]
    # a student cut from the stored crop 2 and then rotated past its edges keeps crop 2 when it is named as source
    rotated_crop = torch.tensor([[0.45, -0.2, 0.5], [0.2, 0.9, 0.0]])
    assert select_views(stored[:1], rotated_crop[None])[0].tolist() == [0]
    kept, inside = select_views(stored[:1], rotated_crop[None], torch.tensor([2]))
    assert kept.tolist() == [2] and torch.allclose(half[:, :2] @ inside[0][:, :2], rotated_crop[:, :2], atol=1e-6)
    assert select_views(stored[:1], rotated_crop[None], torch.tensor([-1]))[0].tolist() == [0]
    assert torch.linalg.det(theta[0][:, :2]) > 0  # the student is not mirrored relative to the chosen view
    assert torch.allclose(mirrored[:, :2] @ theta[0][:, :2], flipped_student[:, :2])


def _manifest(n=6, k=2, views=1, sha="a" * 64, data_sha="d" * 64):
    return {
        "labeler": {"model": "m", "path": "p", "export": "last", "sha256": sha},
        "data": {"spec": "s", "split": "train", "num_images": n, "sha256": data_sha},
        "img_size": 16, "k": k, "grid": [2, 2], "views": views, "num_classes": 4,
        "mean": [0.5] * 3, "std": [0.5] * 3, "seed": 0,
    }  # fmt: skip


def _rows(rows, k=2, views=1):
    b = len(rows)
    logits = torch.randn(b * views, 4, 4)
    values, indices, rest = compress_logits(logits, k)
    theta = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(b, views, 2, 3)
    return np.asarray(rows), values.view(b, views, 4, k), indices.view(b, views, 4, k), rest.view(b, views, 4), theta


def test_half_written_store_is_resumed_never_used(tmp_path):
    files = [f"c/{i}.png" for i in range(6)]
    store = LabelStore.create(tmp_path / "s", _manifest(), files)
    store.write_rows(*_rows([0, 2, 4]))
    with pytest.raises(ValueError, match="half-written.*resume"):
        LabelStore.open(tmp_path / "s")
    again = LabelStore.create(tmp_path / "s", _manifest(), files)  # the same build, run again
    assert again.missing_rows().tolist() == [1, 3, 5]
    assert again.finish() is False
    rows = _rows([1, 3, 5])
    again.write_rows(*rows)
    assert again.finish() is True
    done = LabelStore.open(tmp_path / "s")
    got = done.read([3])
    assert torch.equal(got["indices"][0], rows[2][1].long()) and got["values"].dtype == torch.float16
    assert done.files() == files
    assert done.bytes_per_image() == pytest.approx(4 * 2 * 2 * 2 + 4 * 2 + 24 + 1)


def test_store_of_another_labeler_or_settings_is_refused_and_kept(tmp_path):
    store = LabelStore.create(tmp_path / "s", _manifest(), [str(i) for i in range(6)])
    store.write_rows(*_rows(list(range(6))))
    store.finish()
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(ValueError, match=r"labeler\.sha256.*nothing was overwritten"):
        LabelStore.create(tmp_path / "s", _manifest(sha="b" * 64), [str(i) for i in range(6)])
    with pytest.raises(ValueError, match=r"k: store 2, now 3"):
        LabelStore.create(tmp_path / "s", _manifest(k=3), [str(i) for i in range(6)])
    with pytest.raises(ValueError, match=r"data\.sha256"):
        LabelStore.create(tmp_path / "s", _manifest(data_sha="e" * 64), [str(i) for i in range(6)])
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a label store"):
        LabelStore.create(tmp_path / "other", _manifest(), ["a"])


def test_truncated_store_is_a_clear_error(tmp_path):
    store = LabelStore.create(tmp_path / "s", _manifest(), [str(i) for i in range(6)])
    store.write_rows(*_rows(list(range(6))))
    store.finish()
    path = tmp_path / "s" / "values.f16"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated.*values.f16"):
        LabelStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match="truncated"):
        LabelStore.create(tmp_path / "s", _manifest(), [str(i) for i in range(6)])
    assert path.stat().st_size == 6 * 4 * 2 * 2 - 10  # nothing rewritten


def test_missing_and_reordered_images_are_named(tmp_path):
    paths = [tmp_path / "d" / f"{i}.png" for i in range(6)]
    rel, digest = data_identity(paths, [0, 1, 0, 1, 0, 1])
    assert rel == [f"{i}.png" for i in range(6)]
    m = _manifest(data_sha=digest)
    store = LabelStore.create(tmp_path / "s", m, rel)
    store.write_rows(*_rows(list(range(6))))
    store.finish()
    store = LabelStore.open(tmp_path / "s")
    store.check_data(paths, [0, 1, 0, 1, 0, 1])  # the same data: fine
    extra = [*paths, tmp_path / "d" / "new.png"]
    with pytest.raises(ValueError, match=r"1 training image\(s\) are missing.*new.png"):
        store.check_data(extra, [0, 1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="another order or with other labels"):
        store.check_data(paths[::-1], [1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="outside label store"):
        store.read([6])


def test_not_a_store_and_bad_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a label store"):
        LabelStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        LabelStore.open(tmp_path)


def test_store_views_full_view_is_the_resized_image_and_crops_have_their_theta():
    image = tv_tensors.Image(torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8))
    out = StoreViews(12, views=3, mean=(0, 0, 0), std=(1, 1, 1))({"image": image, "index": 5})
    assert out["views"].shape == (3, 3, 12, 12) and out["theta"].shape == (3, 2, 3)
    full = F.interpolate(image[None].float() / 255, size=(12, 12), mode="bilinear", antialias=True)[0]
    assert torch.allclose(out["views"][0], full, atol=2 / 255)
    assert torch.allclose(out["theta"][0], torch.tensor([[1.0, 0, 0], [0, 1, 0]]), atol=1e-6)
    again = StoreViews(12, views=3, mean=(0, 0, 0), std=(1, 1, 1))({"image": image, "index": 5})
    assert torch.equal(again["theta"], out["theta"])  # seeded by the index: a resumed build stores the same views
    flipped = StoreViews(12, views=2, mean=(0, 0, 0), std=(1, 1, 1), flip_view=True)({"image": image, "index": 5})
    assert torch.allclose(flipped["views"][1], full.flip(-1), atol=2 / 255)  # view 1: the mirrored full image
    assert torch.allclose(flipped["theta"][1], torch.tensor([[-1.0, 0, 0], [0, 1, 0]]), atol=1e-6)
    with pytest.raises(ValueError, match="at least the full view"):
        StoreViews(12, views=1, flip_view=True)


def test_crop_from_theta_recovers_every_box_and_flip():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        H, W = (int(v) for v in torch.randint(7, 300, (2,), generator=gen))
        h, w = int(torch.randint(1, H + 1, (), generator=gen)), int(torch.randint(1, W + 1, (), generator=gen))
        top, left = (
            int(torch.randint(0, H - h + 1, (), generator=gen)),
            int(torch.randint(0, W - w + 1, (), generator=gen)),
        )
        flip = bool(torch.rand((), generator=gen) < 0.5)
        theta = view_affine({"box": (top, left, h, w), "flip": flip, "geometric": []}, (H, W), 224)
        assert crop_from_theta(theta, (H, W)) == ((top, left, h, w), flip)
    rotated = view_affine({"box": (0, 0, 8, 8), "flip": False, "geometric": [Op("Rotate", 10.0)]}, (8, 8), 8)
    with pytest.raises(ValueError, match="not a crop box"):
        crop_from_theta(rotated, (8, 8))


def test_stored_crops_are_the_stores_random_views_and_the_student_takes_one(tmp_path):
    image = tv_tensors.Image(torch.randint(0, 255, (3, 30, 40), dtype=torch.uint8))
    views = StoreViews(16, views=4, mean=(0, 0, 0), std=(1, 1, 1), scale=(0.3, 0.9), flip_view=True)
    built = [views({"image": image, "index": i}) for i in range(6)]
    store = LabelStore.create(tmp_path / "s", {**_manifest(views=4), "flip_view": True}, [f"{i}.png" for i in range(6)])
    rows, values, indices, rest, _ = _rows(range(6), views=4)
    store.write_rows(rows, values, indices, rest, torch.stack([b["theta"] for b in built]))
    assert store.finish()
    crops = StoredCrops(tmp_path / "s")
    assert crops.count == 2  # views 2 and 3: the full view and its mirror are not random crops
    given = crops(4, (30, 40))
    assert [view_affine({"box": b, "flip": f, "geometric": []}, (30, 40), 16) for b, f in given] == [
        pytest.approx(t) for t in built[4]["theta"][2:]
    ]
    # the student view takes one of them: its theta is a stored view's, so select_views finds that very view
    tf = build_transforms("stl_paired", 16, teacher="geometry", rand_augment=None, re_prob=0.0,
                          mean=(0, 0, 0), std=(1, 1, 1), crops_from=str(tmp_path / "s"))  # fmt: skip
    chosen = set()
    for _ in range(20):
        out = tf({"image": image, "index": 4})
        view, theta = select_views(built[4]["theta"][None], out["view_theta"][None])
        assert view.item() == crops.first + out["given_crop"] and torch.allclose(
            theta[0], torch.tensor([[1.0, 0, 0], [0, 1, 0]]), atol=1e-5
        )
        chosen.add(view.item())
        box, flip = given[view.item() - 2]
        crop = F.interpolate(image[None, :, box[0] : box[0] + box[2], box[1] : box[1] + box[3]].float(),
                             size=(16, 16), mode="bilinear", antialias=True)[0]  # fmt: skip
        assert torch.allclose(out["image"] * 255, crop.flip(-1) if flip else crop, atol=1.01)
    assert chosen == {2, 3}
    import pickle

    assert pickle.loads(pickle.dumps(tf)).crops(4, (30, 40)) == given  # data-loader workers reopen the store
    plain = LabelStore.create(tmp_path / "p", _manifest(views=1), [f"{i}.png" for i in range(6)])
    plain.write_rows(*_rows(range(6)))
    plain.finish()
    with pytest.raises(ValueError, match="no random-crop views.*--views N"):
        StoredCrops(tmp_path / "p")
