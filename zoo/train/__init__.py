"""Training and export of the project's own models (needs the ``train`` extra: torch).

Nothing here is imported by the runner; inference runs from the exported ONNX.
"""
