"""ComfyUI's TorchCompileModel in front of LynxSampler, on ComfyUI's own objects (CPU, tiny model).

The node (``comfy_extras.nodes_torch_compile.TorchCompileModel``) puts ``torch.compile`` of the
whole diffusion model behind an APPLY_MODEL wrapper of a clone; LynxSampler then patches that
clone's blocks. Checked: it runs, the compiled result equals the uncompiled one within a tight
tolerance (fp32 here, far inside bf16's), the adapters act in the compiled run, the user's model
stays uncompiled, and none of dynamo's graph breaks is located in this pack's code (ComfyUI has
its own on the CPU: its attention's memory probe and its wrapper executor).

The backend is the node's default, inductor (needs a C++ compiler, as on any CPU inductor run);
``LYNX_E2E_COMPILE_BACKEND=cudagraphs`` picks the node's other choice. Compiling takes about 1-2
minutes on a small CPU, the price of a real compile.
"""
from __future__ import annotations

import os

from comfy_script import run_in_comfy

SETUP = r'''
import logging, re
import comfy.sd
import torch._dynamo
from comfy.patcher_extension import WrappersMP
from comfy_extras.nodes_torch_compile import TorchCompileModel
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY
from lynx_nodes.payloads import AdaptersHandle, ReferenceFeatures
from lynx_core.adapters import LynxAdapters
from lynx_core.face.types import FaceIdentity

backend = sys.argv[3]
repo = sys.argv[1].rstrip("/") + "/"


class Breaks(logging.Handler):
    """Where dynamo's graph breaks happen ("Graph break ... in user code at FILE:LINE")."""
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.where = []
    def emit(self, record):
        msg = record.getMessage()
        m = re.search(r"[Gg]raph break.*? in user code at (\S+?):(\d+)", msg)
        if m:
            reason = msg.split("Graph Break Reason:", 1)[-1].strip().splitlines()[0][:160]
            self.where.append({"file": m.group(1), "line": int(m.group(2)), "reason": reason})
breaks = Breaks()
torch._logging.set_logs(graph_breaks=True)
logging.getLogger("torch._dynamo").addHandler(breaks)

model = comfy.sd.load_diffusion_model(models["dit"])
dm = model.model.diffusion_model
n = len(dm.blocks)
torch.manual_seed(3)
adapters = AdaptersHandle(LynxAdapters.create("full", dim=dm.dim, num_blocks=n, resampler_dim=64, resampler_heads=1,
                                              resampler_dim_head=64, resampler_depth=1), "full")
g = torch.Generator().manual_seed(5)
emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
face = FaceIdentity(embedding=emb, landmarks=np.zeros((1, 5, 2), np.float32), crop112=np.zeros((1, 112, 112, 3), np.uint8),
                    crop256=(torch.rand(1, 256, 256, 3, generator=g) * 255).to(torch.uint8).numpy(),
                    faces_found=[1], chosen=[[0]], provider="cpu")
reference = ReferenceFeatures(cond={b: torch.randn(1, 16, dm.dim, generator=g) for b in range(n)},
                              uncond={b: torch.randn(1, 16, dm.dim, generator=g) for b in range(n)},
                              dim=dm.dim, num_blocks=n, seed=42, face_embedding=emb)
def cond(seed):
    c = torch.zeros(1, 512, 4096)
    c[:, :6] = torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(seed))
    return [[c, {}]]
pos, neg = cond(1), cond(2)

def sample(m, ip_scale=1.0, ref_scale=1.0):
    latent = {"samples": torch.zeros(1, 16, 2, 6, 8)}
    return lynx_nodes.LynxSampler().sample(m, adapters, face, pos, neg, latent, 42, 2, 5.0, 2.0, ip_scale, ref_scale,
                                           0.0, 1.0, "euler", "lynx_official", 3.0, 0,
                                           reference=reference)[0]["samples"]

'''

COMPILE = r'''
res = {}
eager = sample(model)
no_adapters = sample(model, 0.0, 0.0)
compiled_model = TorchCompileModel.execute(model, backend).result[0]
torch._dynamo.utils.counters.clear()
compiled = sample(compiled_model)
res["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
again = sample(compiled_model)
res["max_err"] = float((compiled - eager).abs().max())
res["again_err"] = float((again - compiled).abs().max())
res["adapter_effect"] = float((eager - no_adapters).abs().max())
res["scale"] = float(eager.abs().max())
res["finite"] = bool(torch.isfinite(compiled).all())
res["user_model_compiled"] = bool(model.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY))
res["clone_compiled"] = bool(compiled_model.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY))
res["breaks"] = breaks.where
res["our_breaks"] = [b for b in breaks.where if b["file"].startswith(repo) and "/tests/" not in b["file"]]
print("RESULT " + json.dumps(res))
'''


def test_torch_compile_model_then_lynx_sampler(comfy_server):
    backend = os.environ.get("LYNX_E2E_COMPILE_BACKEND", "inductor")
    res = run_in_comfy(comfy_server, SETUP + COMPILE, backend, timeout=1200)
    assert res["clone_compiled"] and not res["user_model_compiled"]
    assert res["graphs"] > 0, "dynamo compiled nothing: the compile wrapper did not run"
    assert res["finite"]
    # compiled == uncompiled: fp32 reassociation only, far below what the adapters change
    assert res["max_err"] <= 1e-3 * max(1.0, res["scale"]), res
    assert res["adapter_effect"] > 100 * max(res["max_err"], 1e-6), res
    assert res["again_err"] == 0.0  # the second run reuses the compiled graphs
    assert res["our_breaks"] == [], res["our_breaks"]


OVERRIDE = r'''
# ComfyUI's attention switch for one model: transformer_options["optimized_attention_override"]
# (what attention-patch nodes set); ComfyUI's wrap_attn hands it every optimized_attention call.
calls = []
def override(func, q, k, v, *args, **kwargs):
    calls.append([int(q.shape[0]), int(q.shape[1]), int(k.shape[1])])
    return func(q, k, v, *args, **kwargs)
m = model.clone()
m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
with_override = sample(m)
plain = sample(model)
res = {"calls": calls, "blocks": n, "same": bool(torch.equal(with_override, plain))}
print("RESULT " + json.dumps(res))
'''


def test_comfyuis_attention_override_reaches_every_lynx_attention_call(comfy_server):
    """The Lynx block calls ComfyUI's optimized_attention with the model call's transformer_options,
    so --use-sage-attention / --use-flash-attention and per-model overrides apply to all four of its
    attention calls (self, Ref branch, text, ID branch), not only to ComfyUI's own blocks."""
    res = run_in_comfy(comfy_server, SETUP + OVERRIDE, "none", timeout=600)
    calls, n = res["calls"], res["blocks"]
    steps, rows = 2, 3  # two steps, c/u/i batched in one model call
    assert len(calls) == steps * n * 4, calls
    key_lengths = {k for _b, _q, k in calls}
    video = {q for _b, q, _k in calls}
    assert len(video) == 1 and all(b == rows for b, _q, _k in calls)
    assert {video.pop(), 512, 16} <= key_lengths  # self-attention, text, the 16 reference tokens
    assert len(key_lengths) == 4                  # and the ID tokens
    assert res["same"]  # an override that calls the same kernel changes nothing
