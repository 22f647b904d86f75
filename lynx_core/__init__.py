"""Lynx engine: pure PyTorch + numpy, never imports ComfyUI.

Personalized video from one face photo on Wan2.1-T2V (arXiv 2509.15496).
"""
__version__ = "0.1.0"
