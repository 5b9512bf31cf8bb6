"""upstack: depth up-scaling, training, merging and evaluation of open LLMs (the SOLAR 10.7B recipe)."""

__version__ = "0.1.0"
