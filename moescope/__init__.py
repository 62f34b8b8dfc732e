"""moescope: interpretability and analysis of Mixture-of-Experts routing in vision transformers.

Every analysis reads inputs -> image path (:mod:`moescope.faces`) -> forward with routing
capture (:mod:`moescope.forward`, :mod:`moescope.trace`) -> regions (:mod:`moescope.regions`)
-> statistic (:mod:`moescope.stats`) -> :class:`~moescope.results.AnalysisResult`; the runners
(:mod:`moescope.runners`) put those together and the CLI (``moescope --help``) shows them.
"""
import os
from importlib.metadata import PackageNotFoundError, version

ONEDNN_CACHE_CAPACITY = 64
"""oneDNN primitive-cache entries (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, set unless already set;
read when torch creates its first CPU primitive). oneDNN keeps one compiled primitive per
matmul shape, and each MoE expert gets a different token count in every batch, so the
default 1,024 entries (about 0.35 MB each) let a long CPU analysis grow by some 400 MB before
the cache is full; 64 keeps the model's fixed shapes cached and memory flat."""
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))

try:
    __version__ = version("moescope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
