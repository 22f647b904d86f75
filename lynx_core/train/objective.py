"""The training objective of one packed sequence, as a module (so DDP/FSDP can wrap it).

``LynxObjective`` owns the trainable adapters; the frozen base DiT is held outside the module tree
(DDP would otherwise broadcast and inspect 14 B frozen parameters). Its forward takes already-drawn
samples (noise, sigma, condition) and returns the flow-matching loss; everything the inference
passes use is reproduced exactly: 'no identity' is the resampler of a zero vector plus the
grey-image reference, 'no text' is the negative prompt embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..reference import extract_reference_features
from .loss import NO_BOTH, NO_ID, NO_TEXT, NoisedTarget, flow_loss
from .packing import NoisySample, SampleAdapterKV, looped_forward, packed_forward
from .runner import plain_runner
from .types import FixedEmbeddings, TrainSample


def pad_text(text: Tensor, length: int) -> Tensor:
    """Zero-pad a trimmed text embedding to Wan's context length, as inference feeds it."""
    if length <= text.shape[0]:
        return text
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])])


@dataclass
class DrawnSample:
    """A sample with this step's random draws applied."""
    sample: TrainSample
    noised: NoisedTarget
    condition: str  # loss.FULL / NO_TEXT / NO_ID / NO_BOTH


class LynxObjective(nn.Module):
    def __init__(self, adapters: nn.Module, model: nn.Module, fixed: FixedEmbeddings, *,
                 runner=plain_runner, reference_runner=None, packed: bool = True, attention: str = "auto"):
        super().__init__()
        self.adapters = adapters
        object.__setattr__(self, "model", model)  # frozen base: deliberately not a submodule
        self.fixed = fixed
        self.runner = runner
        self.reference_runner = reference_runner
        self.packed = packed
        self.attention = attention

    # -- conditioning -----------------------------------------------------------------------------
    def _identity_inputs(self, drawn: list[DrawnSample], device):
        has_id = [d.condition not in (NO_ID, NO_BOTH) for d in drawn]
        param = self.adapters.resampler.proj_in.weight
        emb = torch.stack([d.sample.face_embedding.float() if keep else
                           torch.zeros_like(d.sample.face_embedding, dtype=torch.float32)
                           for d, keep in zip(drawn, has_id)]).to(device=device, dtype=param.dtype)
        id_tokens = self.adapters.resampler(emb)  # zero rows = the official 'no identity' tokens
        refs = None
        if self.adapters.ref_layers is not None:
            grey = self.fixed.grey_ref_latent
            ref_latents = torch.stack([d.sample.ref_latent if keep else grey for d, keep in zip(drawn, has_id)])
            refs = self._reference_features(ref_latents.to(device))
        return id_tokens, refs

    @torch.no_grad()
    def _reference_features(self, ref_latents: Tensor) -> dict[int, Tensor]:
        model = self.model
        dtype = model.patch_embedding.weight.dtype
        ctx = self.fixed.reference_text.to(device=ref_latents.device, dtype=dtype)
        ctx = ctx.unsqueeze(0).expand(ref_latents.shape[0], -1, -1)
        return extract_reference_features(model, ref_latents.to(dtype), ctx, block_runner=self.reference_runner)

    def _kv_for_block(self, id_tokens: Tensor, refs: dict[int, Tensor] | None, n: int):
        ad = self.adapters

        def kv(index: int) -> list[SampleAdapterKV]:
            ip = ref = None
            layer = ad.ip_layers[str(index)] if str(index) in ad.ip_layers else None
            lite_norm = False
            if layer is not None:
                tokens = layer.tokens_with_registers(id_tokens.to(layer.to_k_ip.weight.dtype))
                k, v = layer.to_k_ip(tokens), layer.to_v_ip(tokens)
                if layer.norm_k_ip is not None:
                    k, lite_norm = layer.norm_k_ip(k), True
                ip = (k, v)
            rl = ad.ref_layers[str(index)] if ad.ref_layers is not None and str(index) in ad.ref_layers else None
            if rl is not None and refs is not None:
                feats = refs[index].to(rl.to_k_ref.weight.dtype)
                ref = (rl.to_k_ref(feats), rl.to_v_ref(feats))
            return [SampleAdapterKV(ip=None if ip is None else (ip[0][j:j + 1], ip[1][j:j + 1]),
                                    ref=None if ref is None else (ref[0][j:j + 1], ref[1][j:j + 1]),
                                    ip_needs_block_norm=not lite_norm)
                    for j in range(n)]
        return kv

    # -- forward ----------------------------------------------------------------------------------
    def predict(self, drawn: list[DrawnSample], device) -> list[Tensor]:
        id_tokens, refs = self._identity_inputs(drawn, device)
        neg = self.fixed.negative_text
        length = getattr(self.model.config, "text_len", 0)
        noisy = [NoisySample(x=d.noised.x_t.to(device), timestep=d.noised.timestep.to(device),
                             text=pad_text(neg if d.condition in (NO_TEXT, NO_BOTH) else d.sample.text,
                                           length).to(device), key=d.sample.key)
                 for d in drawn]
        forward = packed_forward if self.packed else looped_forward
        return forward(self.model, noisy, self._kv_for_block(id_tokens, refs, len(drawn)), self.runner,
                       attention=self.attention)

    def forward(self, drawn: list[DrawnSample], device) -> tuple[Tensor, list[float]]:
        preds = self.predict(drawn, device)
        return flow_loss(preds, [d.noised.target for d in drawn])
