"""Training of the Lynx adapters (resampler, ID-adapter, Ref-adapter) on a frozen Wan DiT.

Free of ComfyUI. ``python -m lynx_core train CONFIG`` runs it from the command line (also under
``torchrun`` / ``accelerate launch``); the ComfyUI training nodes call the same engine.
"""
