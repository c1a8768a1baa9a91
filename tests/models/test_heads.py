"""Projection heads: block specs, DINO head (L2 bottleneck + weight-normed prototypes), iBOT head."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.models.heads import DINOHead, IBOTHead, ProjectionHead


def test_projection_head_from_blocks() -> None:
    head = ProjectionHead([(8, 16, nn.BatchNorm1d(16), nn.ReLU()), (16, 4, None, None)])
    assert head(torch.randn(5, 8)).shape == (5, 4)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert linears[0].bias is None and linears[1].bias is not None


def test_projection_head_errors() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        ProjectionHead([])
    with pytest.raises(ValueError, match="block 1 takes 5"):
        ProjectionHead([(8, 16, None, None), (5, 4, None, None)])


@pytest.mark.parametrize("num_layers", [1, 3])
def test_dino_head_shapes_and_mlp(num_layers: int) -> None:
    head = DINOHead(12, out_dim=32, hidden_dim=24, bottleneck_dim=8, num_layers=num_layers)
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert len(linears) == num_layers and linears[-1].out_features == 8
    assert head(torch.randn(3, 12)).shape == (3, 32)
    assert head(torch.randn(2, 5, 12)).shape == (2, 5, 32)


def test_dino_head_is_cosine_to_unit_prototypes() -> None:
    head = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(7, 6)
    z = F.normalize(head.layers(x), dim=-1)
    w = F.normalize(head.last_layer.parametrizations.weight.original1, dim=-1)
    assert torch.allclose(head(x), z @ w.T, atol=1e-6)
    # |cosine| <= 1 with unit gains
    assert head(x).abs().max() <= 1.0 + 1e-5


def test_norm_last_layer_freezes_gains_only() -> None:
    frozen = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    weight = frozen.last_layer.parametrizations.weight
    gain, direction = weight.original0, weight.original1
    assert not gain.requires_grad and direction.requires_grad
    assert torch.equal(gain, torch.ones_like(gain))
    free = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert len(free.last_layer_parameters()) == 2


def test_dino_head_batchnorm_on_tokens() -> None:
    head = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, use_bn=True)
    assert head(torch.randn(2, 5, 6)).shape == (2, 5, 10)


def test_dino_head_deepcopy_is_independent() -> None:
    head = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    twin = copy.deepcopy(head)
    x = torch.randn(3, 6)
    assert torch.equal(head(x), twin(x))
    with torch.no_grad():
        twin.last_layer.parametrizations.weight.original1.add_(1.0)
    assert not torch.equal(head(x), twin(x))


def test_dino_head_errors() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        DINOHead(6, num_layers=0)
    with pytest.raises(ValueError, match="positive"):
        DINOHead(6, out_dim=0)


def test_ibot_head_shared_and_separate() -> None:
    shared = IBOTHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    cls, patches = torch.randn(2, 6), torch.randn(2, 5, 6)
    c, p = shared(cls, patches)
    assert shared.shared and c.shape == (2, 10) and p.shape == (2, 5, 10)
    assert torch.allclose(p[:, 0], shared(patches[:, 0])[0])
    separate = IBOTHead(6, out_dim=10, patch_out_dim=12, shared=False, hidden_dim=8, bottleneck_dim=4)
    c, p = separate(cls, patches)
    assert not separate.shared and c.shape == (2, 10) and p.shape == (2, 5, 12)
    assert len(separate.last_layer_parameters()) == 2 * len(shared.last_layer_parameters())
    assert separate(cls)[1] is None


@pytest.mark.parametrize("shared", [True, False])
def test_ibot_head_masked_patches_and_their_sum(shared: bool) -> None:
    """``forward_patches_masked``: the rows at the mask, and the sum over every token through one summed row."""
    torch.manual_seed(0)
    head = IBOTHead(6, out_dim=10, patch_out_dim=10 if shared else 12, shared=shared, hidden_dim=8, bottleneck_dim=4)
    patches, mask = torch.randn(3, 5, 6), torch.rand(3, 5) < 0.4
    full = head.forward_patches(patches)  # (3, 5, K)
    masked, (row_sum, rows) = head.forward_patches_masked(patches, mask)
    torch.testing.assert_close(masked, full[mask])
    torch.testing.assert_close(row_sum, full.reshape(-1, full.shape[-1]).sum(0), atol=1e-5, rtol=1e-5)
    assert rows == 15 and row_sum.dtype == torch.float32


def test_separate_ibot_head_shares_the_mlp_as_published() -> None:
    """Published iBOTHead(shared_head=False): [CLS] and patches share the MLP and bottleneck; only the prototype
    layer differs."""
    torch.manual_seed(0)
    shared = IBOTHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    separate = IBOTHead(6, out_dim=10, shared=False, hidden_dim=8, bottleneck_dim=4)
    extra = sum(p.numel() for p in separate.patch_last_layer.parameters())
    assert sum(p.numel() for p in separate.parameters()) == sum(p.numel() for p in shared.parameters()) + extra
    cls, patches = torch.randn(2, 6), torch.randn(2, 5, 6)
    c, p = separate(cls, patches)
    assert torch.allclose(p, separate.patch_last_layer(separate.bottleneck(patches)))
    assert torch.allclose(c, separate.last_layer(separate.bottleneck(cls)))
    assert not torch.allclose(p[:, 0], separate(patches[:, 0])[0])  # other prototypes
    gains = separate.patch_last_layer.parametrizations.weight.original0
    assert torch.all(gains == 1) and not gains.requires_grad  # norm_last_layer applies to both layers
    free = IBOTHead(6, out_dim=10, shared=False, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert free.patch_last_layer.parametrizations.weight.original0.requires_grad
    separate.share_prototypes()
    assert separate.shared and torch.allclose(separate(cls, patches)[1][:, 0], separate(patches[:, 0])[0])


def test_ibot_head_shared_size_mismatch() -> None:
    with pytest.raises(ValueError, match="shared head"):
        IBOTHead(6, out_dim=10, patch_out_dim=12, shared=True)
