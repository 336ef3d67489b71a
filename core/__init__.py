"""Shared contract of every stage: the model spec, image decoding, preprocessing, models, checkpoints.

Importing `core`, `core.spec`, `core.images` or `core.preprocess` never imports torch, so the deployment
runtime (numpy + Pillow + onnxruntime) can use them.
"""
