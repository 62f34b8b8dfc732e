"""moescope: interpretability and analysis of Mixture-of-Experts routing in vision transformers.

Every analysis reads inputs -> image path (:mod:`moescope.faces`) -> forward with routing
capture (:mod:`moescope.forward`, :mod:`moescope.trace`) -> regions (:mod:`moescope.regions`)
-> statistic (:mod:`moescope.stats`) -> :class:`~moescope.results.AnalysisResult`; the runners
(:mod:`moescope.runners`) put those together and the CLI (``moescope --help``) shows them.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moescope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
