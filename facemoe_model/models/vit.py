"""FaceMoE on a plain ViT backbone (paper B.8): timm's VisionTransformer with MoE MLPs.

No class token; the final tokens are flattened into the same ``feature_layer`` head as the
Swin model (the insightface ViT recipe). Module names are timm's (``blocks.3.mlp``).
"""
from __future__ import annotations

import functools

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .heads import MoEBackbone, init_linear

__all__ = ["FaceMoEViT"]


class FaceMoEViT(MoEBackbone, VisionTransformer):
    """FaceMoE ViT: timm ``VisionTransformer`` whose blocks' ``mlp`` are MoE layers.

    Args mirror :class:`~facemoe_model.models.swin.FaceMoESwin` (``depth`` and
    ``num_heads`` are single numbers; ``**moe`` are the :class:`~facemoe_model.moe.MoEConfig`
    fields). ``forward(x)`` returns embeddings.
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
        embedding_dim: int = 512,
        head_dropout: float = 0.25,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **moe,
    ) -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            class_token=False, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
        )
        self.img_size = img_size
        moe_config = self._setup_moe(moe)
        grid = tuple(self.patch_embed.grid_size)
        for block in self.blocks:
            block.mlp = moe_config.layer(
                embed_dim, int(embed_dim * mlp_ratio), dropout=drop_rate, token_grid=grid, num_prefix_tokens=self.num_prefix_tokens
            )
            block.mlp.apply(functools.partial(init_linear, normal=nn.init.trunc_normal_))
        self._setup_head(embed_dim, grid, embedding_dim, head_dropout)

    def forward_patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position embedding ``[B, N, C]``."""
        return self.patch_drop(self._pos_embed(self.patch_embed(x)))
