"""drg-llama: predict the Medicare MS-DRG of a hospital stay from its discharge summary."""

__version__ = "0.1.0"
