# %% [markdown]
# # Expert activation maps (paper D / E: Figures 6 and 8)
#
# Where does each expert of a FaceMoE layer work on a face? `moescope maps` draws, per image and
# expert, a map on the MoE layer's token grid, straight from what the layer computed:
#
# * **routing** maps from the layer's `hook_routing` record (top-1 assignment, top-k membership,
#   normalised combine weight `|w| / sum |w|`, router probability) — never recomputed;
# * **output** maps from its `hook_expert_outputs` point: `‖w_e · expert_e(x)‖` per token, 0 where
#   the expert did not run;
# * **gradient** maps through captum: Grad-CAM of each expert's contribution, and Integrated
#   Gradients of the input, of the score `cos(embedding, reference)`.
#
# Maps are upsampled to the model input (bilinear, `align_corners=False`) and drawn over the face
# with **one colour scale per figure** (per-map min-max would hide before/after differences).
# This notebook runs on the bundled demo: two small FaceMoE checkpoints (`before`, and `after`
# fine-tuned on low-resolution faces) and held-out synthetic faces.

# %%
from moescope.demo import demo_images_dir, demo_split_dir, load_model
from facemoe_model.data.images import list_images
from moescope.runners.maps import analyse_maps, select_paths

before, after = load_model("demo:before"), load_model("demo:after")
paths = select_paths(list_images(demo_images_dir()), images=4)  # 4 faces of different identities
[p.parent.name + "/" + p.name for p in paths]

# %% [markdown]
# ## Figure 6: one row per face, one column per expert, before and after side by side
#
# Combine-weight maps of the first stage (`layers.0`, a 20 x 20 grid; each stage's two blocks
# averaged). The library call returns the maps as arrays (`result.maps[label][group]`,
# `[images, experts, rows, cols]`) as well as the tables.

# %%
fig6 = analyse_maps([before, after], ["demo:before", "demo:after"], paths, kind="weight", progress=False)
{label: {group: m.shape for group, m in groups.items()} for label, groups in fig6.maps.items()}

# %%
fig6.figure("maps")

# %% [markdown]
# ## Numbers, not only pictures
#
# **Region mass**: per expert and facial region, the mean map value over the region's tokens
# (tokens split across regions by area). On top-1 maps this is exactly the routing table of
# `moescope regions --count top1` (a test checks it).

# %%
mass = fig6.tables["region_mass"]
mass[mass["group"] == "layers.0"].pivot_table(index="region", columns=["checkpoint", "expert"], values="mass").round(3)

# %% [markdown]
# **Concentration** per image and expert: entropy of the map normalised to a distribution over
# tokens (divided by `log2 N`: 1 = uniform, i.e. diffuse) and the share of the map's mass on the
# face (vs hair/background; `background_area` is what a uniform map would put there).

# %%
conc = fig6.tables["concentration"]
conc.groupby(["checkpoint", "group", "expert"])[["entropy_normalised", "face_share", "background_area"]].mean().round(3)

# %% [markdown]
# ## Expert output maps
#
# How much each expert adds to each token: the norm of its weighted output. Zero exactly where
# the router did not send the token to that expert.

# %%
out = analyse_maps([after], ["demo:after"], paths, kind="output", progress=False)
out.figure("maps")

# %% [markdown]
# ## Gradient maps: Grad-CAM per expert
#
# The score is the cosine similarity of the embedding to a reference. The image's own clean
# embedding would be useless here: at the clean image that cosine is at its maximum (1) and its
# gradient is zero, so Grad-CAM would vanish. The reference is therefore the mean embedding of the
# other analysed images of the same identity (here two faces each of two identities), and the
# result says so in `settings["reference"]`. Cost: one forward + backward pass per layer and expert.

# %%
pair = [p for identity in ("200000", "200010") for p in select_paths(list_images(demo_images_dir()), ids=[identity])[:2]]
cam = analyse_maps([after], ["demo:after"], pair, kind="gradcam", layers=["layers.1"], progress=False)
print(cam.settings["reference"])
cam.figure("maps")

# %% [markdown]
# ## Figure 8: success vs failure cases
#
# On the bundled gallery/probe split, probes identified correctly (success) or wrongly (failure) at
# Rank-1 by `demo:after` — the same decisions as `moescope eval` — and their maps. The paper says
# failure maps become "diffuse, fragmented, or concentrated in non-informative regions"; here that
# is a testable statement: the mean normalised entropy and face share of the two groups, with
# bootstrap intervals over images, and their difference.

# %%
from facemoe_model.protocols import load_protocols  # noqa: E402

split = load_protocols(split=demo_split_dir(), size=after.img_size).split
cases = analyse_maps([after], ["demo:after"], kind="weight", cases=True, split=split, n_boot=1000, progress=False)
print(cases.summary["images_success"], "success,", cases.summary["images_failure"], "failure")
cases.figure("maps_cases")

# %%
table = cases.tables["cases"]
diff = table[table["case"] == "failure - success"]
diff.pivot_table(index=["group", "expert"], columns="metric", values=["mean", "ci_low", "ci_high"]).round(3)

# %% [markdown]
# On the demo data (when this notebook was written), every `failure - success` interval of entropy and face share contains 0: the
# failure maps are neither measurably more diffuse nor more on the background than the success
# maps. The claim is not supported here (a small synthetic demo; run `moescope maps --cases
# success,failure --split DIR` on real data to test it there).
