"""Muon as the GXPO authors run it (github SwapniL-afk-now/final-gxpo 1a301e16, Code/SFPO/verl/workers/muon.py,
the Moonlight / Kimi reference implementation): a hybrid optimizer. Hidden 2-D matrices take Muon's step

    B <- mu B + g;  D = g + mu B (Nesterov; else D = B);  O = NS5(D)
    theta <- (1 - lr wd) theta - lr 0.2 sqrt(max(A, B)) O

with NS5 five Newton-Schulz iterations of the quintic (a, b, c) = (3.4445, -4.7750, 2.0315) on
X = D / (||D||_F + 1e-7) (transposed when A > B), computed in bfloat16 as theirs; every other parameter (the
embeddings, the LM head, biases, norms) takes their AdamW branch,

    m <- lerp(m, g, 1 - b1);  v <- lerp(v, g^2, 1 - b2)
    theta <- (1 - lr wd) theta - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)

(eps added to sqrt(v) before the bias correction, where torch's AdamW adds it after). Both branches take the
same lr and weight decay from their param group.

torch.optim.Muon has the same decoupled weight decay and (adjust_lr_fn "match_rms_adamw") the same lr
adjustment, which is taken from it; its momentum is an EMA (lerp: (1 - mu) times the buffer above) and its
Newton-Schulz divides by max(||D||, eps) in bfloat16 only. Those two follow the authors here (the same direction
up to the 1e-7). ns_dtype "param" runs Newton-Schulz in the parameter's dtype (the float64 tests).

Under FSDP2 the parameters are DTensors sharded on dim 0. The momentum buffer stays sharded like the parameter;
each matrix's Nesterov direction is all-gathered (DTensor.full_tensor), orthogonalized whole, and this rank's
rows are kept (a Replicate -> Shard redistribute, no communication). The AdamW branch is coordinatewise and runs
on the local shards. State: momentum_buffer (Muon), step / exp_avg / exp_avg_sq (AdamW), tensors shaped (and
sharded) like the parameter, so state_dict() and torch.distributed.checkpoint round-trip as AdamW's do.

Which parameter takes which branch (their build_muon): a parameter whose global shape is 2-D, contiguous, and
whose name names no embedding or output head takes Muon; the rest AdamW. So Muon takes named parameters
(model.named_parameters()), or param groups that say {"use_muon": True / False}."""

import math
from dataclasses import asdict, dataclass

import torch

from .flat.buffers import DTensor, local
from .flat_adamw import advance_adamw_state

__all__ = ["Muon", "MuonConfig", "is_embedding_or_head", "muon_owned", "newton_schulz"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # their X / (||X|| + 1e-7)
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64, "param": None}
ADJUST_LR_FNS = ("match_rms_adamw", "original", "spectral_unclamped")  # torch.optim.Muon's; theirs is the first
# their _is_embedding_or_head: a lower-cased substring of the parameter's name
EMBEDDING_OR_HEAD = ("embed_tokens", "embedding", "word_embeddings", "tok_embeddings", ".wte", "lm_head",
                     "output_head", "output_projection", "output_layer")



def adjust_lr(lr: float, adjust_lr_fn: str, shape) -> float:
    """torch.optim.Muon's learning-rate adjustments (tests/test_muon.py checks them against torch's where it has
    them); "match_rms_adamw" is the authors', lr 0.2 sqrt(max(A, B))."""
    A, B = shape[:2]
    ratio = {"match_rms_adamw": 0.2 * math.sqrt(max(A, B)), "original": math.sqrt(max(1, A / B)),
             "spectral_unclamped": math.sqrt(A / B)}[adjust_lr_fn]
    return lr * ratio


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = NS_EPS,
                  dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """Their zeropower_via_newtonschulz5: the quintic Newton-Schulz iteration on G / (||G|| + eps), in dtype
    (None: G's), transposed so that the Gram matrix is the smaller one; returns a tensor of that dtype."""
    if G.ndim != 2:
        raise ValueError(f"G must be a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(G.dtype if dtype is None else dtype)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


def is_embedding_or_head(name: str) -> bool:
    lowered = name.lower()
    return any(token in lowered for token in EMBEDDING_OR_HEAD)


def _takes_muon(name: str, p: torch.Tensor) -> bool:
    """Their build_muon: a global 2-D, contiguous parameter that is not an embedding or an output head."""
    return p.ndim == 2 and local(p).is_contiguous() and not is_embedding_or_head(name)


def muon_owned(optimizer) -> set:
    """ids of the parameters that take Muon's matrix step (empty for any other optimizer)."""
    if not isinstance(optimizer, Muon):
        return set()
    return {id(p) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}


@dataclass
class MuonConfig:
    """Muon's own knobs, declared once: Muon's keywords beside lr / weight_decay / betas / eps, and the trainer's
    [muon] section (read with optim.name = "muon"). The defaults are the authors' launchers'."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "bfloat16"  # NS_DTYPES: the dtype Newton-Schulz runs in ("param": the parameter's)
    adjust_lr_fn: str = "match_rms_adamw"  # torch.optim.Muon's names; theirs: 0.2 sqrt(max(A, B))

    def checks(self, cfg=None) -> list:
        """(field, holds, what it must be); cfg: a trainer's whole config (unused)."""
        return [("momentum", isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1, "in [0, 1)"),
                ("nesterov", isinstance(self.nesterov, bool), "true or false"),
                ("ns_steps", isinstance(self.ns_steps, int) and not isinstance(self.ns_steps, bool)
                 and 1 <= self.ns_steps < 100, "an int in [1, 100)"),
                ("ns_dtype", self.ns_dtype in NS_DTYPES, f"one of {tuple(NS_DTYPES)}"),
                ("adjust_lr_fn", self.adjust_lr_fn in ADJUST_LR_FNS, f"one of {ADJUST_LR_FNS}")]

    def check(self):
        for name, ok, expected in self.checks():
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    def kwargs(self) -> dict:
        return asdict(self)


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "param"
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in NS_DTYPES.items() if v is not None}
        if dtype not in names:
            raise ValueError(f"ns_dtype must be one of {tuple(NS_DTYPES)}, got {dtype}")
        return names[dtype]
    return dtype


def _param_groups(params) -> list:
    """Muon's param groups from named parameters (classified by their rule) or from groups that say use_muon."""
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    if all(isinstance(x, dict) for x in params):
        for group in params:
            if not isinstance(group.get("use_muon"), bool):
                raise ValueError("params: each param group given to Muon needs use_muon = True or False")
        return params
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in params):
        raise ValueError("params: Muon needs each parameter's name, to keep embeddings and the LM head on AdamW: "
                         "pass model.named_parameters(), or param groups with use_muon = True / False")
    seen = set()
    for _, p in params:
        if id(p) in seen:
            raise ValueError("params: Muon received a parameter twice")
        seen.add(id(p))
    matrices = [p for name, p in params if _takes_muon(name, p)]
    if not matrices:
        raise ValueError("params: no 2-D hidden matrix for Muon (every parameter is 1-D, an embedding or an output "
                         "head); refusing an all-AdamW run, as the authors' build_muon does")
    others = [p for name, p in params if not _takes_muon(name, p)]
    return [{"params": matrices, "use_muon": True}] + ([{"params": others, "use_muon": False}] if others else [])


class Muon(torch.optim.Optimizer):
    """Muon(model.named_parameters(), lr=1e-6, weight_decay=1e-2): Muon's step on the hidden matrices, the authors'
    AdamW branch on the rest (the module docstring). As a rule's base: GXPO(model.named_parameters(), base=Muon,
    lr=...)."""

    adaptive = True  # parameters stored in bf16 lose its updates (optim/precision.py)

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8,
                 momentum: float = MuonConfig.momentum, nesterov: bool = MuonConfig.nesterov,
                 ns_steps: int = MuonConfig.ns_steps, ns_dtype=MuonConfig.ns_dtype,
                 adjust_lr_fn: str = MuonConfig.adjust_lr_fn, ns_coefficients=NS_COEFFICIENTS, ns_eps: float = NS_EPS):
        knobs = MuonConfig(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=_dtype_name(ns_dtype),
                           adjust_lr_fn=adjust_lr_fn)
        knobs.check()
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two values in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not (len(ns_coefficients) == 3 and ns_eps > 0):
            raise ValueError(f"ns_coefficients must be three floats and ns_eps > 0, got {ns_coefficients!r}, "
                             f"{ns_eps!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **knobs.kwargs(),
                        ns_coefficients=tuple(ns_coefficients), ns_eps=ns_eps)
        super().__init__(_param_groups(params), defaults)

    def add_param_group(self, param_group: dict):
        if not isinstance(param_group.get("use_muon"), bool):
            raise ValueError("params: each param group given to Muon needs use_muon = True or False")
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in param_group["params"] if param_group["use_muon"] else ():
            if p.ndim != 2:
                raise ValueError(f"params: a use_muon group holds a parameter of shape {tuple(p.shape)}; "
                                 "Muon's step needs 2-D matrices")
        super().add_param_group(param_group)

    def muon_owned(self) -> set:
        return muon_owned(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group):
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        dtype = NS_DTYPES[group["ns_dtype"]]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad, buf, theta = local(p.grad), local(state["momentum_buffer"]), local(p)
            buf.mul_(mu).add_(grad)
            direction = grad.add(buf, alpha=mu) if group["nesterov"] else buf
            update = newton_schulz(_whole(direction, p), group["ns_steps"], group["ns_coefficients"],
                                   group["ns_eps"], dtype)
            theta.mul_(1 - lr * wd)
            theta.add_(_this_ranks_rows(update, p).to(theta.dtype),
                       alpha=-adjust_lr(lr, group["adjust_lr_fn"], tuple(p.shape)))

    def _adamw_step(self, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            t = advance_adamw_state(state, p)
            grad, m, v, theta = local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"]), local(p)
            m.lerp_(grad, 1 - beta1)
            v.lerp_(grad.square(), 1 - beta2)
            normalized = m / (eps + v.sqrt())
            correction = (1 - beta1**t) / (1 - beta2**t) ** 0.5
            theta.mul_(1 - lr * wd)
            theta.add_(normalized, alpha=-lr / correction)


def _whole(local_matrix: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole matrix whose local shard is local_matrix (p's sharding; collective under FSDP2)."""
    if not isinstance(p, DTensor):
        return local_matrix
    return DTensor.from_local(local_matrix, p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride()).full_tensor()


def _this_ranks_rows(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole matrix laid out as p (a local slice: no communication)."""
    if not isinstance(p, DTensor):
        return full
    from torch.distributed.tensor import Replicate

    replicated = DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return replicated.redistribute(p.device_mesh, p.placements).to_local()
