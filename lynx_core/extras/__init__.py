"""Optional bridges to third-party model classes (diffusers' Wan VAE, transformers' UMT5).

lynx_core does not re-implement UMT5 or the Wan VAE; the standalone path uses these only when the
optional packages are installed and real weights are given.
"""
