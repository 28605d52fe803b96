"""fgcupy inside other libraries' models.

``fgcupy.integrations.diffusers``: attention processors for diffusers' Wan 2.1, HunyuanVideo and
CogVideoX transformers (``apply`` / ``remove``). Importing this package needs nothing beyond
fgcupy; diffusers is imported only when a model is patched (``pip install fgcupy[diffusers]``).
"""
