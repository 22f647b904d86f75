"""A fixed linear map between Wan2.1 latents and RGB: the cheap preview that stands in for the VAE
in the tiny demo (no VAE is bundled). The 16x3 factors are Wan2.1's published latent-to-RGB
preview coefficients; the inverse is their least-squares pseudo-inverse."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WAN21_LATENT_RGB = torch.tensor([
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420], [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975], [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861]])
WAN21_LATENT_RGB_BIAS = torch.tensor([-0.1835, -0.0868, -0.3360])


def latent_to_rgb(latents: torch.Tensor, spatial: int = 8, temporal: int = 4) -> np.ndarray:
    """[1,16,F,H,W] latents -> uint8 frames [(F-1)*temporal+1, H*spatial, W*spatial, 3]."""
    lat = latents[0].float().permute(1, 2, 3, 0)  # F,H,W,16
    rgb = (lat @ WAN21_LATENT_RGB + WAN21_LATENT_RGB_BIAS).clamp(-1, 1) * 0.5 + 0.5
    rgb = rgb.permute(0, 3, 1, 2)  # F,3,H,W
    rgb = F.interpolate(rgb, scale_factor=spatial, mode="bilinear", align_corners=False)
    frames = [rgb[:1]] + [rgb[i:i + 1].expand(temporal, -1, -1, -1) for i in range(1, rgb.shape[0])]
    out = torch.cat(frames).permute(0, 2, 3, 1)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def rgb_to_latent(image: np.ndarray, spatial: int = 8) -> torch.Tensor:
    """uint8 [H,W,3] -> [1,16,1,H/8,W/8] through the pseudo-inverse (demo stand-in for VAE encode)."""
    x = torch.from_numpy(image).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
    x = F.avg_pool2d(x, spatial)[0].permute(1, 2, 0)  # H,W,3
    pinv = torch.linalg.pinv(WAN21_LATENT_RGB)          # 3x16
    lat = (x - WAN21_LATENT_RGB_BIAS) @ pinv
    return lat.permute(2, 0, 1)[None, :, None]
