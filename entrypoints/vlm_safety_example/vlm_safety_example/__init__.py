"""Example vlm-safety-plugins plugin; everything lives in ``plugin.py``."""
