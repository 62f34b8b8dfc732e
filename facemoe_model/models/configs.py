"""The named FaceMoE configurations (registered on import)."""
from __future__ import annotations

from .registry import register_model
from .swin import FaceMoESwin
from .vit import FaceMoEViT

register_model(
    "facemoe_swin_official", FaceMoESwin,
    "The authors' FaceMoE: Swin-B-like, 120px, patch 6, window 5, depths (2,18,2), N=3 k=2 logit weights (464M params).",
    img_size=120, patch_size=6, embed_dim=384, depths=(2, 18, 2), num_heads=(8, 16, 16), window_size=5,
    ape=True, num_experts=3, top_k=2, weighting="logits",
)
register_model(
    "facemoe_swin_tiny", FaceMoESwin,
    "CPU-sized Swin FaceMoE for demos and tests: 120px, patch 6 (20x20 tokens), embed 32, depths (2,2,2), N=3 k=2.",
    img_size=120, patch_size=6, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=5,
    ape=True, num_experts=3, top_k=2, weighting="logits",
)
register_model(
    "facemoe_vit_tiny", FaceMoEViT,
    "CPU-sized ViT FaceMoE: 112px, patch 8 (14x14 tokens), embed 96, depth 6, N=3 k=2.",
    img_size=112, patch_size=8, embed_dim=96, depth=6, num_heads=3, num_experts=3, top_k=2, weighting="logits",
)
register_model(
    "facemoe_vit_base", FaceMoEViT,
    "ViT-B-scale FaceMoE for the paper's backbone ablation (B.8): 112px, patch 8, embed 768, depth 12, N=3 k=2.",
    img_size=112, patch_size=8, embed_dim=768, depth=12, num_heads=12, num_experts=3, top_k=2, weighting="logits",
)
