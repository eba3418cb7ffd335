"""covfeat: transfer-learning COVID-19 vs NORMAL chest-radiograph classifiers on a cached feature store.

Stage one (:mod:`covfeat.extract`) runs a frozen ImageNet backbone once and writes the
pre-pool feature maps to HDF5 (:mod:`covfeat.cache`); stage two (:mod:`covfeat.train`)
trains the paper's head on those cached tensors in seconds.
"""

__version__ = "0.1.0"
