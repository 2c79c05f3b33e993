"""Engines: what generates behind ``vlm-safety serve`` (``base.Engine`` is the interface)."""
