# %% [markdown]
# # Inference cost (paper B.11)
#
# Latency, throughput and peak memory with and without routing capture, FLOPs of the sparse top-k
# dispatch against a dense all-experts layer, and the router's share of a forward pass
# (`moescope bench demo:after`; `moescope bench facemoe_swin_official` benchmarks the full-size
# model with random weights). Timings depend on the machine and its load: those cells are tagged
# `volatile`; FLOPs are exact.

# %%
import torch
from moescope.cost import benchmark_model, machine_info
from moescope.demo import load_model

model = load_model("demo:after")

# %% tags=["volatile"]
result = benchmark_model(model, batch_sizes=(1, 8), repeats=3, checkpoint="demo:after")
{k: result.summary[k] for k in ("cpu", "cpu_count", "torch_threads", "memory_method")}

# %% tags=["volatile"]
result.tables["latency"][["batch_size", "capture", "latency_ms", "latency_iqr_ms", "throughput_img_per_s", "peak_memory_mb"]].round(2)

# %% [markdown]
# The hooks' overhead: hooked / unhooked latency, the median of paired, interleaved blocks.

# %% tags=["volatile"]
result.tables["capture_overhead"][["batch_size", "latency_ms_off", "latency_ms_routing", "capture_ratio"]].round(3)

# %% [markdown]
# FLOPs per image, counted by `torch.utils.flop_counter.FlopCounterMode`: only the k chosen experts
# run for each token; the dense row forces every expert (`RoutingOverride(k=num_experts)`).

# %%
result.tables["flops"][["routing", "experts_per_token", "gflops_per_image", "expert_flops_per_image",
                        "router_flops_per_image", "other_flops_per_image", "relative_to_topk"]]

# %% tags=["volatile"]
result.tables["router_time"][["batch_size", "forward_ms", "router_ms", "experts_ms", "router_share", "routing_share"]].round(3)

# %% [markdown]
# Throughput by batch size, without and with routing capture:

# %% tags=["volatile"]
# %matplotlib inline
import seaborn as sns

sns.barplot(data=result.tables["latency"], x="batch_size", y="throughput_img_per_s", hue="capture").set(ylabel="images / s")
