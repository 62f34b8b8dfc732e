# %% [markdown]
# # Routing stability under attacks and degradations (paper B.16, B.10, B.3)
#
# Perturb the probes (gallery fixed), then measure recognition, expert usage and how far the
# routing moved: per token `1 - IoU` of the top-k expert index sets before vs after, and the
# share of tokens whose top-1 expert changed — per MoE layer and per facial region
# (`moescope attack`, `moescope degrade`).
#
# The paper's claims tested here at toy scale (a 1.7 M-parameter demo FaceMoE on synthetic faces):
# expert usage stays ≈33% per expert with <2% deviation under FGSM/PGD/MIM (B.16); mild blur and
# JPEG barely change accuracy (B.10); accuracy drops little from 96 px down to 32 px, then fast (B.3).

# %%
from facemoe_model.protocols import load_protocols
from moescope.attacks import AttackSetting
from moescope.demo import demo_split_dir, load_model
from moescope.runners.stability import attack_stability, degradation_grid, degradation_stability

CKPT = "demo:after"                           # or a path to your own / official FaceMoE checkpoint
model = load_model(CKPT)
data = load_protocols(split=demo_split_dir(), size=model.img_size)   # or split="/path/to/split"

# %% [markdown]
# ## Attacks (B.16)
#
# L∞ FGSM, PGD and MIM (10 steps of 2/255) on 50 probes (one per identity), pushing each probe
# away from its gallery mate (`mate-away`). Budgets in grey levels of the [0, 1] image.

# %%
attacks = [AttackSetting(name, eps=e / 255) for name in ("fgsm", "pgd", "mim") for e in (2, 8)]
attacked = attack_stability(model, data, attacks, max_probes=50, progress=False, checkpoint=CKPT)
cols = ["setting", "Rank-1", "Rank-5", "Verification accuracy", "routing change", "top-1 changed",
        "Expert 0 (%)", "Expert 1 (%)", "Expert 2 (%)", "max usage deviation (pts)", "Linf max (x255)", "loss before", "loss after"]
attacked.tables["stability"][cols].round(3)

# %% [markdown]
# Routing change per MoE layer and per facial region (over all layers):

# %%
attacked.tables["routing_change"].pivot_table(index="setting", columns="layer", values="set_distance", sort=False).round(3)

# %%
r = attacked.tables["region_change"].query("layer == 'all'")
r.pivot_table(index="setting", columns="region", values="set_distance", sort=False).round(3)

# %%
attacked.figure("attack_sweep")

# %% [markdown]
# ## Degradations (B.10, B.3) and region occlusion
#
# Every probe; blur σ in px, JPEG quality, Gaussian noise σ in grey levels, down-up resampling
# to S × S px (the demo images are 120 px) and occlusion of one facial region found from the
# Face Mesh landmarks.

# %%
grid = degradation_grid(blur=[1, 2, 5], jpeg=[90, 30, 10], noise=[10], resolution=[8, 16, 32, 64, 96],
                        occlude=["eyes", "nose", "mouth"])
degraded = degradation_stability(model, data, grid, progress=False, checkpoint=CKPT)
degraded.tables["stability"][cols[:10]].round(3)

# %%
r = degraded.tables["region_change"].query("layer == 'all'")
r.pivot_table(index="setting", columns="region", values="set_distance", sort=False).round(3)

# %%
degraded.figure("degrade_sweep")
