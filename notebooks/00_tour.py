# %% [markdown]
# # A short tour of moescope
#
# moescope analyses how a Mixture-of-Experts vision transformer routes image tokens to its experts.
# This tour runs on the bundled demo: two small FaceMoE checkpoints (`demo:before`, trained on
# high-resolution synthetic faces, and `demo:after`, the same model fine-tuned on low-resolution
# versions) and a folder of held-out face images. Every step is one library call; the same analyses
# are the CLI commands named in each heading, and `moescope report` puts all of them on one page.

# %%
# %matplotlib inline
from facemoe_model.data.images import list_images
from moescope.demo import load_model, demo_images_dir

BEFORE, AFTER = "demo:before", "demo:after"   # or paths to your own / official FaceMoE checkpoints
IMAGES = list_images(demo_images_dir())       # or list_images("/path/to/faces")
before, after = load_model(BEFORE), load_model(AFTER)
len(IMAGES)

# %% [markdown]
# ## The model (`moescope info`)
# One row per MoE layer: its token grid, number of experts and how many each token uses.

# %%
from moescope.runners.info import describe

describe(after).tables["moe_layers"]

# %% [markdown]
# ## Which expert each facial region goes to (`moescope regions`, paper B.1 / B.2)

# %%
from moescope.runners.regions import analyse_regions

regions = analyse_regions([before, after], [BEFORE, AFTER], IMAGES, n_boot=100, progress=False)
regions.tables["paper_after"]

# %%
regions.figure("region_routing_heatmap")

# %% [markdown]
# ## How much fine-tuning moved each layer (`moescope cka`, paper B.12-B.14)

# %%
from moescope.runners.drift import analyse_drift

drift = analyse_drift(before, after, [BEFORE, AFTER], IMAGES, progress=False)
drift.tables["lowest_cka"]

# %% [markdown]
# ## What the experts cost (`moescope bench`, paper B.11)
# FLOPs per image of the sparse top-k dispatch against a dense layer that runs every expert.

# %%
import torch
from moescope.cost import flops_table

flops, _ = flops_table(after.eval(), torch.zeros(1, 3, after.img_size, after.img_size))
flops[["routing", "experts_per_token", "gflops_per_image", "relative_to_topk"]]

# %% [markdown]
# The other notebooks go deeper: 01 region routing, 02 drift, 03 interventions, 04 maps,
# 05 stability, 06 bench. The whole study as one HTML page: `moescope report demo:before demo:after`.
