"""fgcupy inside other libraries' models.

``fgcupy.integrations.diffusers``: an attention processor for diffusers' Wan 2.1 and HunyuanVideo
transformers (``apply`` / ``remove``). Importing this package needs nothing beyond fgcupy;
diffusers is imported only when a model is patched (``pip install fgcupy[diffusers]``).
"""
