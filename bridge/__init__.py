"""Converters between model outputs and the tools pathologists use (QuPath, FastPathology)."""
