"""Training options: one flat, documented dataclass, read from TOML or JSON.

Every field is documented in docs/training.md. Unknown keys are an error (a typo must not silently
train with a default), and every check names the option and the fix.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("auto", "full", "lora", "id_only", "ref_only")
TIMESTEP_SAMPLING = ("shift", "logit_normal", "uniform")
OPTIMIZERS = ("adamw", "adamw8bit")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")
LR_SCHEDULES = ("constant", "cosine", "linear")

# Settings that change what a checkpoint's weights and optimizer state mean: a resume with another
# value would silently train something else, so it is refused. The rest (max_steps, intervals,
# paths of the output) may change between runs of the same training.
RESUME_MUST_MATCH = (
    "wan", "adapters", "variant", "resampler_init", "mode", "lora_rank", "lora_alpha", "optimizer",
    "seed", "token_budget", "grad_accum", "timestep_sampling", "shift", "drop_id", "drop_text",
    "drop_both", "dataset",
)


class TrainConfigError(ValueError):
    """A training option is missing, unknown or out of range; the message names it and the fix."""


@dataclass
class TrainConfig:
    # -- what trains --------------------------------------------------------------------------------
    out: str = "lynx_training"          # run folder: checkpoints/, adapters/, loss.png, log.jsonl
    wan: str = ""                       # Wan2.1 T2V DiT .safetensors, or "tiny" (random, for tests/demo)
    adapters: str = ""                  # released Lynx adapters to start from; "" = fresh initialisation
    variant: str = "full"               # for a fresh initialisation: "full" or "lite"
    resampler_init: str = ""            # optional resampler .safetensors of the same shape (InstantID's fits lite)
    mode: str = "auto"                  # auto | full | lora | id_only | ref_only
    lora_rank: int = 64
    lora_alpha: float = 0.0             # 0 = same as the rank (scale 1)
    # -- data ---------------------------------------------------------------------------------------
    dataset: str = ""                   # dataset folder (see docs/training.md), or a built cache folder
    cache: str = ""                     # cache folder; "" = <out>/cache
    vae: str = ""                       # standalone: diffusers Wan VAE folder
    text_encoder: str = ""              # standalone: diffusers-layout UMT5 folder
    arcface: str = ""                   # ArcFace IR-SE50 .pth/.onnx for the identity photos ("" = the usual folders)
    detector: str = "auto"              # face detector: auto | mtcnn | insightface:antelopev2 | ...
    token_budget: int = 33_600          # patch tokens per packed sequence (the paper's 33.6k per GPU)
    # -- optimisation -------------------------------------------------------------------------------
    max_steps: int = 1000
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    optimizer: str = "adamw"            # adamw | adamw8bit (needs bitsandbytes)
    lr_schedule: str = "constant"       # constant | cosine | linear (after the warm-up)
    warmup_steps: int = 0
    grad_accum: int = 1
    grad_clip: float = 1.0              # max global grad norm; 0 = off
    # -- loss ---------------------------------------------------------------------------------------
    timestep_sampling: str = "shift"    # shift | logit_normal | uniform
    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    drop_id: float = 0.05               # P(no identity): resampler(0) + grey reference, trains the "u" pass
    drop_text: float = 0.05             # P(no text, identity kept): negative prompt, trains the "i" pass
    drop_both: float = 0.05             # P(neither)
    seed: int = 0
    # -- evaluation and output ----------------------------------------------------------------------
    eval_every: int = 100               # fixed-timestep held-out loss every K steps; 0 = off
    eval_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)
    heldout: float = 0.05               # fraction of pairs kept for the eval loss
    save_every: int = 500               # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 3           # newest N kept; 0 = all
    export_dtype: str = "bf16"          # bf16 | fp16 | fp32
    log_every: int = 10
    # -- memory and devices -------------------------------------------------------------------------
    device: str = "auto"                # auto | cuda | cuda:N | cpu
    dtype: str = "bf16"                 # the frozen base's compute dtype (fp32 on the CPU)
    gradient_checkpointing: bool = True
    blocks_to_swap: int = 0             # -1 = auto (from free VRAM), 0 = all resident
    fp8_base: bool = False              # fp8 host copies of swapped base blocks
    offload_activations: bool = False   # checkpointed block inputs to pinned host RAM
    attention: str = "auto"             # auto | sdpa | flash (never SageAttention in training)
    distributed: str = "auto"           # auto (DDP when launched by torchrun/accelerate) | ddp | fsdp | none
    data: dict[str, Any] = field(default_factory=dict)  # [data] table: cache settings (docs/training.md)

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.eval_sigmas = tuple(float(s) for s in self.eval_sigmas)
        self.validate()

    def validate(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise TrainConfigError(f"{name} = {value!r} is not one of {', '.join(allowed)}")

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                need = ">= 0" if allow_zero else "> 0"
                raise TrainConfigError(f"{name} = {value} must be {need}")

        choice("mode", MODES)
        choice("timestep_sampling", TIMESTEP_SAMPLING)
        choice("optimizer", OPTIMIZERS)
        choice("distributed", DISTRIBUTED)
        choice("lr_schedule", LR_SCHEDULES)
        choice("variant", ("full", "lite"))
        choice("export_dtype", ("bf16", "fp16", "fp32"))
        choice("dtype", ("bf16", "fp16", "fp32"))
        choice("attention", ("auto", "sdpa", "flash"))
        for name in ("max_steps", "grad_accum", "token_budget", "lora_rank", "lr", "shift"):
            positive(name)
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "grad_clip",
                     "weight_decay", "log_every", "lora_alpha"):
            positive(name, allow_zero=True)
        for name in ("drop_id", "drop_text", "drop_both", "heldout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise TrainConfigError(f"{name} = {value} must be a probability in [0, 1)")
        if self.drop_id + self.drop_text + self.drop_both >= 1.0:
            raise TrainConfigError(
                f"drop_id + drop_text + drop_both = {self.drop_id + self.drop_text + self.drop_both:g} "
                "leaves no conditioned samples; keep their sum well under 1 (the paper-style default is 0.05 each)")
        if any(not 0.0 < s < 1.0 for s in self.eval_sigmas):
            raise TrainConfigError(f"eval_sigmas = {list(self.eval_sigmas)} must lie strictly between 0 and 1")
        if self.blocks_to_swap < -1:
            raise TrainConfigError(f"blocks_to_swap = {self.blocks_to_swap}: use -1 (auto), 0 (off) or a count")
        if not self.wan:
            raise TrainConfigError("wan is not set: give the Wan2.1-T2V DiT .safetensors to train on "
                                   "(or \"tiny\" for the built-in random test model)")

    # ----------------------------------------------------------------------------------------------
    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha or self.lora_rank) / self.lora_rank

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else self.out_dir / "cache"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        data["eval_sigmas"] = list(self.eval_sigmas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        # TOML users group options in tables ([model], [train], ...): flatten one level. Only
        # [data] is a real table (the cache settings).
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key != "data":
                flat.update(value)
            else:
                flat[key] = value
        unknown = sorted(set(flat) - known)
        if unknown:
            hint = ", ".join(unknown)
            raise TrainConfigError(f"{source}: unknown option(s) {hint}; every option is listed in docs/training.md")
        return cls(**flat)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"training config {path} does not exist; pass a .toml or .json file")
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise TrainConfigError(f"{path}: not valid JSON ({err})") from None
        elif path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as err:
                raise TrainConfigError(f"{path}: not valid TOML ({err})") from None
        else:
            raise TrainConfigError(f"{path}: training configs are .toml or .json files")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, str(path))
