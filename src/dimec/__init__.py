"""dimec: distributed inference of transformer classifiers across mobile, edge and cloud tiers."""

__version__ = "0.1.0"
