"""Segmentation without pixel labels: the Python package behind the Snakemake workflow.

Every stage is a function reachable from the command line (``python -m pipeline <stage> ...``);
the package never imports Snakemake.
"""

__version__ = "0.1.0"
