# %% [markdown]
# # Selective drift (paper B.12 / B.13 / B.14)
#
# Layer-wise CKA between the two checkpoints, the most changed layers, per-expert parameter shift
# and routing agreement (`moescope cka demo:before demo:after`).

# %%
# %matplotlib inline
from facemoe_model.data.images import list_images
from moescope.demo import load_model, demo_images_dir

BEFORE, AFTER = "demo:before", "demo:after"   # or paths to your own / official FaceMoE checkpoints
IMAGES = list_images(demo_images_dir())       # or list_images("/path/to/faces")

# %%
from moescope.runners.drift import analyse_drift

result = analyse_drift(load_model(BEFORE), load_model(AFTER), [BEFORE, AFTER], IMAGES, progress=False)
result.tables["cka"]

# %%
result.figure("cka_by_depth")

# %% [markdown]
# The five layers fine-tuning changed most (lowest CKA, B.13):

# %%
result.tables["lowest_cka"]

# %% [markdown]
# Each expert's parameter shift, all MoE layers together (B.14):

# %%
result.tables["expert_shift_total"]

# %% [markdown]
# The share of tokens the two checkpoints route alike:

# %%
result.tables["routing_agreement"]
