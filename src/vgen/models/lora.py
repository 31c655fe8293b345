"""Low-rank adapters (LoRA) on the UNet's linear projections, applied from outside the model.

:func:`apply_lora` swaps every targeted ``nn.Linear`` for a :class:`LoRALinear`: the same module with the same
``weight``/``bias`` parameters (so every base key, checkpoint and the key manifest stay as they are) plus two
bias-free linears, ``lora_down`` [rank, in] and ``lora_up`` [out, rank]:

    y = W x + b + scale * up(down(x)),   scale = alpha / rank, or 1 when alpha is None (InstructVideo)

``lora_down`` starts at N(0, (1/rank)^2), ``lora_up`` at zero, so an adapted model starts as the base model.
LoRA weights are saved and loaded on their own (:func:`save_lora` / :func:`load_lora`: a small safetensors file
with the rank, alpha and targets in its metadata), merged into the base weights for inference
(:func:`merge_lora`, W += scale * up @ down) and unmerged again (:func:`unmerge_lora`).

Written here rather than taken from PEFT because PEFT renames the wrapped weights (``to_q.base_layer.weight``),
which would change every base key, and pulls in ``transformers``. The original VGen spelling of the adapter keys
(``to_q_lora.down_linear.weight``) is handled by :mod:`vgen.compat.vgen`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.adapters import Adapter

# q, k, v and output projections of every attention (spatial self/cross, temporal) of the UNet3D.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FORMAT = "vgen-lora"


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``scale * up(down(x))`` (skipped while merged or disabled)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapter(rank, alpha)

    def _add_adapter(self, rank: int, alpha: float | None) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            raise ValueError(f"lora alpha must be a number > 0 or null (scale 1), got {alpha!r}")
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_down = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_up = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.rank = rank
        self.alpha = alpha
        self.scale = 1.0 if alpha is None else float(alpha) / rank
        self.merged = False
        self.lora_enabled = True
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float | None = None) -> LoRALinear:
        """Adapt ``linear`` in place of it: its ``weight`` and ``bias`` Parameters are reused, not copied."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        module._add_adapter(rank, alpha)
        return module.train(linear.training)

    def reset_lora_parameters(self) -> None:
        nn.init.normal_(self.lora_down.weight, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` [out, in], computed in float32 at least."""
        dtype = torch.promote_types(self.lora_up.weight.dtype, torch.float32)
        return (self.lora_up.weight.to(dtype) @ self.lora_down.weight.to(dtype)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or not self.lora_enabled:
            return out
        update = self.lora_up(self.lora_down(x))
        return out + (update if self.scale == 1.0 else update * self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------- applying
def _matches(name: str, targets: Sequence[str]) -> bool:
    """``name`` is targeted when it equals a pattern or ends with ``.<pattern>`` (shell wildcards allowed)."""
    return any(fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(name, f"*.{t}") for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None,
               targets: Sequence[str] = ATTENTION_TARGETS) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose name matches ``targets`` by a :class:`LoRALinear`.

    Patterns match the full module name or its tail after a dot, with shell wildcards: ``to_q`` adapts every
    ``*.to_q``; ``*.attn1.to_q`` only self-attention queries. Returns the adapted module names; raises if none
    matched or ``model`` already has LoRA.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora targets must be a non-empty list of module-name patterns, got {targets!r}")
    if lora_modules(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; apply_lora runs once")
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is nn.Linear and _matches(name, targets)]
    if not chosen:
        raise ValueError(f"lora targets {targets} match no nn.Linear of {type(model).__name__}; examples of "
                         f"valid patterns: {list(ATTENTION_TARGETS)}")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(module, rank, alpha))
    return [name for name, _ in chosen]


def lora_modules(model: nn.Module) -> OrderedDict[str, LoRALinear]:
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_config(model: nn.Module) -> dict:
    """``{rank, alpha, modules}`` of the adapters of ``model`` (one rank and alpha for all of them)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (call apply_lora first)")
    settings = {(m.rank, m.alpha) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"LoRA adapters with different (rank, alpha): {sorted(settings, key=str)}")
    rank, alpha = settings.pop()
    return {"rank": rank, "alpha": alpha, "modules": list(modules)}


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [f"{name}.{sub}.weight" for name in lora_modules(model) for sub in ("lora_down", "lora_up")]


def mark_only_lora_trainable(model: nn.Module) -> int:
    """``requires_grad`` True on the LoRA weights only; returns how many parameters are trainable."""
    names = set(lora_parameter_names(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (call apply_lora first)")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        count += param.numel() if name in names else 0
    return count


# ---------------------------------------------------------------------------------------------- merge / switch
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scale * up @ down); forward then skips the adapters.

    For inference on unsharded weights (a sharded FSDP2/ZeRO-3 model must be gathered first).
    """
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` (exact up to float rounding of the add and subtract)."""
    for module in lora_modules(model).values():
        module.unmerge()


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base network (adapters skipped) inside the block, e.g. for a regulariser."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise RuntimeError("LoRA is merged into the base weights: unmerge_lora(model) before disabling it")
    previous = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(modules, previous):
            m.lora_enabled = enabled


# ---------------------------------------------------------------------------------------------- persistence
def lora_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Only the LoRA weights (``<module>.lora_down.weight``, ``<module>.lora_up.weight``), detached."""
    state = OrderedDict()
    for name, module in lora_modules(model).items():
        if module.merged:
            raise RuntimeError(f"{name}: LoRA is merged into the base weights; unmerge_lora(model) before saving")
        state[f"{name}.lora_down.weight"] = module.lora_down.weight.detach()
        state[f"{name}.lora_up.weight"] = module.lora_up.weight.detach()
    return state


def check_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one line naming every missing, unexpected and mis-shaped LoRA key of ``state``."""
    expected = lora_state_dict(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not expected:
        raise ValueError(f"{source}: the model has no LoRA adapters to load into (call apply_lora first)")
    problems = [f"{title} {items[:6]}{' ...' if len(items) > 6 else ''} ({len(items)})"
                for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if items]
    if problems:
        raise KeyError(f"{source}: LoRA weights do not match the model's adapters: " + "; ".join(problems))


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "LoRA state dict") -> None:
    """Load LoRA weights strictly (every adapter, nothing else); nothing changes when the check fails."""
    check_lora_state_dict(model, state, source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


def save_lora(model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the LoRA weights (and their rank, alpha and module list) to a safetensors file, atomically."""
    config = lora_config(model)
    info = {"format": LORA_FORMAT, "rank": str(config["rank"]), "alpha": json.dumps(config["alpha"]),
            "modules": json.dumps(config["modules"]), **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    safetensors.torch.save_file(state, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(weights, metadata)`` of a file written by :func:`save_lora`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA weights must be a .safetensors file written by vgen.models.lora.save_lora")
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != LORA_FORMAT:
        raise ValueError(f"{path}: not a vgen LoRA file (metadata format={metadata.get('format')!r}, "
                         f"expected {LORA_FORMAT!r})")
    return safetensors.torch.load_file(str(path)), metadata


def load_lora(model: nn.Module, path: str | Path) -> None:
    """Load a :func:`save_lora` file into ``model``'s adapters; their rank and alpha must be the file's."""
    state, metadata = read_lora(path)
    config = lora_config(model)
    saved = (int(metadata["rank"]), json.loads(metadata["alpha"]))
    if saved != (config["rank"], config["alpha"]):
        raise ValueError(f"{path}: LoRA rank/alpha {saved} differ from the model's adapters "
                         f"({config['rank']}, {config['alpha']})")
    load_lora_state_dict(model, state, str(path))


# ---------------------------------------------------------------------------------------------- the adapter
class LoRA(Adapter):
    """LoRA as an :class:`vgen.models.adapters.Adapter`: ``rank``, ``alpha`` (None = scale 1, InstructVideo),
    ``targets`` (module-name patterns, as :func:`apply_lora`), ``weights`` (a :func:`save_lora` file to start from).
    """

    markers = (".lora_down.", ".lora_up.", "_lora.")

    def __init__(self, rank: int = 4, alpha: float | None = None, targets: Sequence[str] | str = ATTENTION_TARGETS,
                 weights: str | None = None):
        self.rank, self.alpha = rank, alpha
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.weights = weights

    def apply(self, unet: nn.Module) -> list[str]:
        modules = apply_lora(unet, self.rank, self.alpha, self.targets)
        if self.weights is not None:
            load_lora(unet, self.weights)
        return modules

    def parameter_names(self, unet: nn.Module) -> list[str]:
        return lora_parameter_names(unet)

    def config(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    def merge(self, unet: nn.Module) -> None:
        merge_lora(unet)

    def disabled(self, unet: nn.Module):
        return lora_disabled(unet)

    def unmerge(self, unet: nn.Module) -> None:
        unmerge_lora(unet)

    def load_weights(self, unet: nn.Module, path: str | Path) -> None:
        load_lora(unet, path)
