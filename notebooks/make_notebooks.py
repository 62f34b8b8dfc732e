"""Write the analysis notebooks (run: python notebooks/make_notebooks.py). Each notebook is a
few cells over the library functions the CLI uses, on the bundled demo by default."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = """\
from facemoe_model.data.images import list_images
from moescope.demo import load_model, demo_images_dir, demo_split_dir
BEFORE, AFTER = "demo:before", "demo:after"   # or paths to your own / official FaceMoE checkpoints
IMAGES = list_images(demo_images_dir())       # or list_images("/path/to/faces")"""

NOTEBOOKS = {
    "01_region_routing.ipynb": [
        new_markdown_cell("# Region routing (paper B.1 / B.2)\n\nWhich expert each facial region is routed to, before and after low-resolution fine-tuning."),
        new_code_cell(SETUP),
        new_code_cell(
            "from moescope.runners.regions import analyse_regions\n"
            "result = analyse_regions([load_model(BEFORE), load_model(AFTER)], [BEFORE, AFTER], IMAGES, n_boot=200, progress=False)\n"
            "result.summary"
        ),
        new_code_cell('result.tables["paper_after"]'),
        new_code_cell('result.tables["delta"].pivot(index="region", columns="expert", values="delta").round(1)'),
        new_code_cell(
            "import seaborn as sns\n"
            "sns.catplot(data=result.tables[\"region_routing\"], x=\"region\", y=\"percent\", hue=\"expert\", col=\"checkpoint\", kind=\"bar\", height=3.5, aspect=1.6)"
        ),
    ],
    "02_drift.ipynb": [
        new_markdown_cell("# Selective drift (paper B.12 / B.13 / B.14)\n\nLayer-wise CKA between the two checkpoints, the most changed layers, per-expert parameter shift, routing agreement."),
        new_code_cell(SETUP),
        new_code_cell(
            "from moescope.runners.drift import analyse_drift\n"
            "result = analyse_drift(load_model(BEFORE), load_model(AFTER), [BEFORE, AFTER], IMAGES, progress=False)\n"
            "result.tables[\"cka\"]"
        ),
        new_code_cell('result.tables["lowest_cka"]'),
        new_code_cell('result.tables["expert_shift_total"]'),
        new_code_cell('result.tables["routing_agreement"]'),
    ],
    "03_interventions.ipynb": [
        new_markdown_cell("# Expert interventions (paper B.17 / B.7)\n\nDrop, switch or randomly route experts and measure what recognition loses."),
        new_code_cell(SETUP),
        new_code_cell(
            "from facemoe_model.protocols import load_protocols\n"
            "from moescope.interventions import plan_interventions\n"
            "from moescope.runners.ablate import ablate_experts\n"
            "model = load_model(AFTER)\n"
            "data = load_protocols(split=demo_split_dir(), size=model.img_size)\n"
            "plan = plan_interventions(model, drop=[\"singles\"], switch=[None], random=True)\n"
            "result = ablate_experts(model, data, plan, progress=False)\n"
            "result.tables[\"ablation\"]"
        ),
        new_code_cell('result.tables["expert_usage"].query("layer == \'all\'").pivot(index="intervention", columns="expert", values="percent").round(1)'),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
