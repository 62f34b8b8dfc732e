# %% [markdown]
# # Region routing (paper B.1 / B.2)
#
# Which expert each facial region is routed to, before and after low-resolution fine-tuning
# (`moescope regions demo:before --compare demo:after`).

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
from facemoe_model.data.images import list_images
from moescope.demo import load_model, demo_images_dir

BEFORE, AFTER = "demo:before", "demo:after"   # or paths to your own / official FaceMoE checkpoints
IMAGES = list_images(demo_images_dir())       # or list_images("/path/to/faces")

# %%
from moescope.runners.regions import analyse_regions

result = analyse_regions([load_model(BEFORE), load_model(AFTER)], [BEFORE, AFTER], IMAGES, n_boot=200, progress=False)
{k: result.summary[k] for k in ("images_found", "images_analysed", "images_no_face", "nmi_before", "nmi_after")}

# %% [markdown]
# The paper's table for the fine-tuned checkpoint: routing frequency (%) per region, with 95%
# bootstrap intervals over images.

# %%
result.tables["paper_after"]

# %% [markdown]
# What fine-tuning changed (percentage points, after - before):

# %%
result.tables["delta"].pivot(index="region", columns="expert", values="delta").round(1)

# %%
result.figure("region_routing_heatmap")

# %%
import seaborn as sns

grid = sns.catplot(data=result.tables["region_routing"], x="region", y="percent", hue="expert", col="checkpoint",
                   kind="bar", height=3.5, aspect=1.6)
grid.set_xticklabels(rotation=30)
plt.show()
