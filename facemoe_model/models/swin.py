"""FaceMoE on a Swin backbone, laid out exactly like the authors' network.

Built from timm's Swin parts (``PatchEmbed``, ``SwinTransformerBlock``, ``PatchMerging``)
with every block's MLP replaced by a :class:`~facemoe_model.moe.MoELayer`. Unlike timm's
own ``SwinTransformer``, patch merging sits at the *end* of a stage (``layers.0.downsample``)
as in the official code, so the official state_dict keys load unchanged. Spatial tensors are
NHWC throughout, as in timm.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn

from ..moe import MoEConfig
from .heads import MoEBackbone, init_linear

__all__ = ["FaceMoESwin", "SwinStage"]


class SwinStage(nn.Module):
    """``depth`` Swin blocks on one resolution, then optional 2x2 patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        moe: MoEConfig,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for j in range(depth):
            block = SwinTransformerBlock(
                dim=dim,
                input_resolution=resolution,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if j % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path[j] if drop_path else 0.0,
            )
            block.mlp = moe.layer(dim, int(dim * mlp_ratio), dropout=drop_rate, token_grid=resolution)
            self.blocks.append(block)
        self.downsample = PatchMerging(dim, 2 * dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class FaceMoESwin(MoEBackbone, nn.Module):
    """FaceMoE Swin: patch embed (+ absolute position), Swin stages with MoE MLPs, final norm,
    flattened tokens, ``feature_layer`` embedding head.

    Args:
        img_size: square input size (official: 120).
        patch_size: patch size (official: 6 -> 20x20 tokens).
        embed_dim: channels of the first stage (doubles per stage).
        depths / num_heads: blocks and attention heads per stage.
        window_size: attention window (shrinks to the stage resolution when larger).
        ape: add the absolute position embedding ``absolute_pos_embed``.
        embedding_dim: output embedding size; head_dropout: dropout inside ``feature_layer``.
        **moe: the MoE settings, fields of :class:`~facemoe_model.moe.MoEConfig`
            (``num_experts``, ``top_k``, ``weighting``, ``renormalize``, ``aux_loss``, ...).

    ``forward(x)`` maps normalised images ``[B, 3, img_size, img_size]`` to embeddings
    ``[B, embedding_dim]``; ``aux_loss()`` sums the MoE layers' auxiliary losses of the last
    forward pass.
    """

    def __init__(
        self,
        img_size: int = 120,
        patch_size: int = 6,
        in_chans: int = 3,
        embed_dim: int = 384,
        depths: Sequence[int] = (2, 18, 2),
        num_heads: Sequence[int] = (8, 16, 16),
        window_size: int = 5,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ape: bool = True,
        embedding_dim: int = 512,
        head_dropout: float = 0.25,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **moe,
    ) -> None:
        super().__init__()
        moe_config = self._setup_moe(moe)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=nn.LayerNorm, output_fmt="NHWC",
        )
        grid = self.patch_embed.grid_size
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim)) if ape else None
        self.pos_drop = nn.Dropout(drop_rate)
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        dim, res = embed_dim, tuple(grid)
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            self.layers.append(
                SwinStage(
                    dim, res, depth, heads, window_size, downsample=not last, moe=moe_config,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                )
            )
            if not last:
                dim, res = 2 * dim, ((res[0] + 1) // 2, (res[1] + 1) // 2)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self._setup_head(dim, res, embedding_dim, head_dropout)
        self.apply(init_linear)
        if self.absolute_pos_embed is not None and not self.absolute_pos_embed.is_meta:
            trunc_normal_(self.absolute_pos_embed, std=0.02)

    def forward_patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute position embedding, NHWC."""
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed.reshape(1, *x.shape[1:])
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
