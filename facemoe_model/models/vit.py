"""FaceMoE on a plain ViT backbone (paper B.8): timm's VisionTransformer with MoE MLPs.

No class token; the final tokens are flattened into the same ``feature_layer`` head as the
Swin model (the insightface ViT recipe). Module names are timm's (``blocks.3.mlp``).
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..moe import MoELayer, total_aux_loss
from .heads import feature_layer

__all__ = ["FaceMoEViT"]


class FaceMoEViT(VisionTransformer):
    """FaceMoE ViT: timm ``VisionTransformer`` whose blocks' ``mlp`` are MoE layers.

    Args mirror :class:`~facemoe_model.models.swin.FaceMoESwin` (``depth`` and
    ``num_heads`` are single numbers). ``forward(x)`` returns embeddings.
    """

    def __init__(
        self,
        img_size: int = 112,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_experts: int = 3,
        top_k: int = 2,
        weighting: str = "logits",
        renormalize: bool = False,
        aux_loss: str = "official",
        embedding_dim: int = 512,
        head_dropout: float = 0.25,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            class_token=False, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
        )
        self.img_size = img_size
        grid = tuple(self.patch_embed.grid_size)
        for block in self.blocks:
            block.mlp = MoELayer(
                embed_dim, int(embed_dim * mlp_ratio), num_experts, top_k, weighting=weighting,
                renormalize=renormalize, aux_loss=aux_loss, dropout=drop_rate, token_grid=grid,
                num_prefix_tokens=self.num_prefix_tokens,
            )
            for m in block.mlp.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self.final_grid = grid
        self.feature_layer = feature_layer(embed_dim * grid[0] * grid[1], embedding_dim, head_dropout)

    def forward_patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position embedding ``[B, N, C]``."""
        return self.patch_drop(self._pos_embed(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_layer(self.forward_features(x).flatten(1))

    def aux_loss(self) -> torch.Tensor:
        """Sum of every MoE layer's auxiliary loss from the last forward pass."""
        return total_aux_loss(self)
