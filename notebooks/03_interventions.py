# %% [markdown]
# # Expert interventions (paper B.17 / B.7)
#
# Drop, switch or randomly route experts and measure what recognition loses
# (`moescope ablate demo:after --drop singles --switch --random`).

# %%
from facemoe_model.protocols import load_protocols
from moescope.demo import load_model, demo_split_dir
from moescope.interventions import plan_interventions
from moescope.runners.ablate import ablate_experts

AFTER = "demo:after"                          # or a path to your own / official FaceMoE checkpoint
model = load_model(AFTER)
data = load_protocols(split=demo_split_dir(), size=model.img_size)   # or split="/path/to/split"

# %%
plan = plan_interventions(model, drop=["singles"], switch=[None], random=True)
result = ablate_experts(model, data, plan, progress=False, checkpoint=AFTER)
result.tables["ablation"]

# %% [markdown]
# Expert usage (%) over all MoE layers under each intervention:

# %%
result.tables["expert_usage"].query("layer == 'all'").pivot(index="intervention", columns="expert", values="percent").round(1)
