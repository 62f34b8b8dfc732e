"""moescope: interpretability and analysis of Mixture-of-Experts routing in vision transformers.

Start at :mod:`moescope.trace` (what each MoE layer computed), :mod:`moescope.regions`
(facial regions on token grids) and the analyses :mod:`moescope.region_routing`,
:mod:`moescope.drift` and :mod:`moescope.interventions`; the CLI is ``moescope --help``.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moescope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
