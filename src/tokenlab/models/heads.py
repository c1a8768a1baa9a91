"""Heads that sit on a backbone's tokens: projection heads for self-distillation.

A head is built from block specs by ``ProjectionHead`` (lightly's pattern): each block is
``(in_dim, out_dim, norm_layer | None, act_layer | None)`` and becomes Linear -> norm -> activation. Method heads
are thin subclasses that only choose the blocks and add what is special to them.

- ``DINOHead`` (DINO [0], iBOT [1]): MLP ``in -> hidden -> ... -> bottleneck`` with GELU, then L2 normalisation,
  then a weight-normalised, bias-free linear layer onto ``K`` prototypes:

      z = MLP(x),   u = z / ||z||_2,   out_k = g_k * <v_k / ||v_k||_2, u>

  with the gains ``g`` fixed to 1 by default (``norm_last_layer``), which keeps training stable.
- ``IBOTHead``: the [CLS] and patch projections of iBOT: one ``DINOHead`` for both (shared) or, as in the published
  iBOT head with ``shared_head=False``, one MLP for both and a separate prototype layer for the patch tokens.

- [0]: DINO: Emerging Properties in Self-Supervised Vision Transformers, 2021, https://arxiv.org/abs/2104.14294
- [1]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["BlockSpec", "DINOHead", "IBOTHead", "ProjectionHead"]

# (in_dim, out_dim, norm layer or None, activation or None)
BlockSpec = tuple[int, int, "nn.Module | None", "nn.Module | None"]


class ProjectionHead(nn.Module):
    """An MLP built from block specs: each block is Linear, then the optional norm, then the optional activation.

    Args:
        blocks: ``[(in_dim, out_dim, norm_layer or None, act_layer or None), ...]``; a block with a norm layer gets a
            bias-free Linear (the norm's shift replaces it).

    Raises:
        ValueError: no blocks, non-positive sizes, or consecutive blocks whose sizes do not chain.
    """

    def __init__(self, blocks: Sequence[BlockSpec]) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a projection head needs at least one block")
        layers: list[nn.Module] = []
        prev_out: int | None = None
        for i, (in_dim, out_dim, norm, act) in enumerate(blocks):
            if in_dim < 1 or out_dim < 1:
                raise ValueError(f"block {i} has non-positive sizes ({in_dim}, {out_dim})")
            if prev_out is not None and in_dim != prev_out:
                raise ValueError(f"block {i} takes {in_dim} features but block {i - 1} gives {prev_out}")
            layers.append(nn.Linear(in_dim, out_dim, bias=norm is None))
            layers.extend(m for m in (norm, act) if m is not None)
            prev_out = out_dim
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP on the last axis: (..., in_dim) -> (..., out_dim)."""
        return self.layers(x)


class DINOHead(ProjectionHead):
    """DINO/iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    iBOT: "the projection head ... is a 3-layer MLP with hidden dimension 2048, followed by l2-normalized bottleneck
    with dimension 256 and a weight-normalized fully connected layer with K dimensions"; the head is shared by the
    [CLS] token and the patch tokens.

    Args:
        in_dim: Backbone feature size C.
        out_dim: K prototypes (iBOT: 8192).
        hidden_dim: Hidden size of the MLP (2048).
        bottleneck_dim: Size of the L2-normalised bottleneck (256).
        num_layers: Linear layers in the MLP (3); 1 maps ``in_dim`` straight to the bottleneck.
        use_bn: BatchNorm after the hidden linears (off in iBOT's ViT recipes).
        norm_last_layer: Fix the weight-norm gains of the last layer to 1 (not trained).
        act_layer: Activation class of the hidden layers.

    Raises:
        ValueError: ``num_layers < 1`` or non-positive sizes.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(
                f"head sizes must be positive, got {in_dim=}, {out_dim=}, {hidden_dim=}, {bottleneck_dim=}"
            )
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        blocks: list[BlockSpec] = [
            (dims[i], dims[i + 1], nn.BatchNorm1d(dims[i + 1]) if use_bn else None, act_layer())
            for i in range(num_layers - 1)
        ]
        blocks.append((dims[-2], dims[-1], None, None))
        super().__init__(blocks)
        # BatchNorm1d needs (R, C): with it, every leading axis is folded into one before the MLP.
        self._fold_batch = use_bn
        self.apply(_init_linear)
        self.last_layer = _prototype_layer(bottleneck_dim, out_dim, norm_last_layer)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.bottleneck_dim, self.norm_last_layer = bottleneck_dim, norm_last_layer

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., D) the L2-normalised bottleneck ``u`` (the input of the prototype layer)."""
        if self._fold_batch:
            lead = x.shape[:-1]
            z = self.layers(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)  # (..., C) -> (R, C) -> (..., D)
        else:
            z = self.layers(x)
        return F.normalize(z, dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., K) prototype scores (cosine similarities times the gains)."""
        return self.last_layer(self.bottleneck(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer (iBOT freezes them during the first epoch)."""
        return list(self.last_layer.parameters())


class IBOTHead(DINOHead):
    """The [CLS] and patch projections of iBOT: one MLP, one or two prototype layers.

    Shared (iBOT's ViT recipes): [CLS] and patch tokens go through the same head. Not shared: as in the published
    ``iBOTHead(shared_head=False)``, both still go through the same MLP and L2-normalised bottleneck, and only the
    weight-normalised prototype layer differs (``patch_last_layer``, ``patch_out_dim`` prototypes).

    Args:
        in_dim: Backbone feature size C.
        out_dim: K prototypes of the [CLS] head (8192).
        patch_out_dim: K of the patch prototype layer when not shared (defaults to ``out_dim``).
        shared: One prototype layer for both (iBOT's default recipes) or a separate one for the patches.
        **kwargs: ``DINOHead`` options (hidden_dim, bottleneck_dim, num_layers, use_bn, norm_last_layer).

    Raises:
        ValueError: ``patch_out_dim`` differing from ``out_dim`` with a shared head.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int | None = None,
        shared: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(in_dim, out_dim, **kwargs)  # type: ignore[arg-type]
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        if shared and patch_out_dim != out_dim:
            raise ValueError(f"a shared head has one output size; got out_dim={out_dim}, patch_out_dim={patch_out_dim}")
        self.patch_last_layer: nn.Module | None = (
            None if shared else _prototype_layer(self.bottleneck_dim, patch_out_dim, self.norm_last_layer)
        )
        self.patch_out_dim = patch_out_dim

    @property
    def shared(self) -> bool:
        """Whether [CLS] and patch tokens share the prototype layer (they always share the MLP)."""
        return self.patch_last_layer is None

    def share_prototypes(self) -> None:
        """Drop the separate patch prototype layer: patches then use the [CLS] one.

        The published teacher head (``shared_head_teacher=True``) when the student's is not shared.
        """
        self.patch_last_layer = None
        self.patch_out_dim = self.out_dim

    def forward(  # type: ignore[override]
        self, cls: torch.Tensor, patches: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``cls`` (B, C) -> (B, K); ``patches`` (B, N, C) -> (B, N, K_patch) (``None`` passes through)."""
        cls_out = self.last_layer(self.bottleneck(cls))
        if patches is None:
            return cls_out, None
        return cls_out, self.forward_patches(patches)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(..., C)`` -> ``(..., K_patch)``; any leading shape, e.g. the masked tokens ``(M, C)``."""
        return (self.patch_last_layer or self.last_layer)(self.bottleneck(patches))

    def forward_patches_masked(
        self, patches: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
        """The outputs at ``mask``'s tokens and the sum of the outputs over *all* tokens, without the other rows.

        The prototype layer is linear and bias-free, so ``sum_i W u_i = W sum_i u_i``: one summed row through it
        instead of every unmasked token (the iBOT teacher needs no more: its patch targets are read at the masked
        tokens, its center from the mean of all). The summed row runs in float32, outside autocast.

        Args:
            patches: (B, N, C) patch tokens.
            mask: (B, N) bool.

        Returns:
            ``(masked, (row_sum, rows))``: (M, K_patch) outputs at the masked tokens in row-major order, the (K_patch,)
            float32 sum of the outputs over all B N tokens, and B N.
        """
        layer = self.patch_last_layer or self.last_layer
        u = self.bottleneck(patches)  # (B, N, D)
        with torch.autocast(u.device.type, enabled=False):
            row_sum = layer(u.float().sum(dim=(0, 1))[None])[0].float()  # (D,) -> (1, D) -> (K,)
        return layer(u[mask]), (row_sum, u.shape[0] * u.shape[1])

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layers (frozen during the first epochs of iBOT)."""
        params = list(self.last_layer.parameters())
        if self.patch_last_layer is not None:
            params += list(self.patch_last_layer.parameters())
        return params


def _prototype_layer(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    """Weight-normalised, bias-free ``Linear(in_dim, out_dim)`` with gains 1 (frozen when ``norm_last_layer``)."""
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    gain = layer.parametrizations.weight.original0
    with torch.no_grad():
        gain.fill_(1.0)
    gain.requires_grad_(not norm_last_layer)
    return layer


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
