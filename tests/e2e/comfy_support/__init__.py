"""Test-only ComfyUI node pack, linked into custom_nodes by the e2e fixture (never shipped).

ComfyUI builds its UMT5 text encoder from a fixed JSON config (4096 wide, 24 blocks of 64 heads,
a 256k vocabulary: 5.7 B parameters), so a tiny random UMT5 cannot go through the stock
CLIPLoader. This node loads the tiny file through ComfyUI's own ``comfy.sd.load_clip`` with
``clip_type=WAN`` and the small sizes passed as ComfyUI's per-model config override
(``model_options["umt5xxl_model_config"]``). The result is a genuine ComfyUI CLIP object (the
same UMT5 class, SentencePiece tokenizer and padding to 512 tokens); CLIPTextEncode and the Lynx
nodes use it exactly as they use a real UMT5-XXL.
"""
from __future__ import annotations

import json


class LynxE2ETinyUMT5Loader:
    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),
                                           {"tooltip": "A tiny UMT5 written by tests/e2e/tiny_models.py."})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing/lynx_e2e"

    def load(self, clip_name):
        import comfy.sd
        import folder_paths
        from safetensors import safe_open

        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        with safe_open(path, "pt") as f:
            config = json.loads((f.metadata() or {})["lynx_e2e_umt5_config"])
        clip = comfy.sd.load_clip(ckpt_paths=[path], clip_type=comfy.sd.CLIPType.WAN,
                                  model_options={"umt5xxl_model_config": config})
        return (clip,)


NODE_CLASS_MAPPINGS = {"LynxE2ETinyUMT5Loader": LynxE2ETinyUMT5Loader}
NODE_DISPLAY_NAME_MAPPINGS = {"LynxE2ETinyUMT5Loader": "Lynx e2e: tiny UMT5 loader (test only)"}
