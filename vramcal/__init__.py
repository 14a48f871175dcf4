"""vramcal: GPU memory you can plan on. The command line lives in ``vramcal.cli``."""

__version__ = "0.1.0"
