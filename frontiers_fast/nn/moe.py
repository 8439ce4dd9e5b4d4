"""A drop-in for transformers' ``MixtralSparseMoeBlock`` on the fused MoE ops.

Parameter names and shapes are those of transformers 5.x, so a Mixtral
block's ``state_dict`` loads strictly:

  gate.weight           [E, H]      router
  experts.gate_up_proj  [E, 2I, H]  gate rows first, then up rows
  experts.down_proj     [E, H, I]

:func:`from_mixtral` converts a block in either transformers layout (the fused
5.x tensors or the 4.x per-expert ``w1``/``w2``/``w3`` linears) to these
three tensors, and :func:`mixtral_activation` reads its activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_dims,
    check_features,
    check_in_range,
    check_index_tensor,
    check_int,
    check_option,
    check_real,
    check_tensor,
)
from ..ops.moe import ACTIVATIONS, fused_moe, moe_route

__all__ = ["MixtralSparseMoeBlock", "MoeTopKRouter", "MoeExperts", "from_mixtral", "mixtral_activation"]


class MoeTopKRouter(nn.Module):
    """Softmax top-k router: ``forward(x [T, H]) -> (logits [T, E], weights [T, k] float32, ids [T, k] int32)``.

    The ids are int32, where transformers' router returns int64: call
    ``ids.long()`` before feeding them to code that one-hot encodes them.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, 1)
        num_experts = check_int("num_experts", num_experts, 1)
        top_k = check_int("top_k", top_k, 1, num_experts, why=f" (num_experts={num_experts})")
        self.top_k, self.num_experts, self.hidden_dim = top_k, num_experts, hidden_size
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: Tensor):
        # Before the reshape: a wrong width whose size divides evenly would otherwise be
        # silently regrouped into rows of hidden_size.
        check_features(
            "hidden_states",
            hidden_states,
            "the module's hidden_size",
            self.hidden_dim,
            like=("weight", self.weight),
        )
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        weights, ids = moe_route(logits, self.top_k, "softmax", renormalize=True)
        return logits, weights, ids


class MoeExperts(nn.Module):
    """E gated-MLP experts in the fused layout: ``forward(x [T, H], ids, weights) -> [T, H]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, activation: str = "silu"):
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, 1)
        intermediate_size = check_int("intermediate_size", intermediate_size, 1)
        num_experts = check_int("num_experts", num_experts, 1)
        check_option("activation", activation, ACTIVATIONS)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        # Checked here under the module's own argument names; fused_moe would name x, ids and weights.
        check_features(
            "hidden_states",
            hidden_states,
            "the module's hidden_size",
            self.hidden_dim,
            like=("gate_up_proj", self.gate_up_proj),
        )
        check_dims("hidden_states", hidden_states, 2, "[T, hidden_size]")
        check_index_tensor("top_k_index", top_k_index, (torch.int32, torch.int64))
        check_dims("top_k_index", top_k_index, 2, "[T, top_k]")
        check_tensor("top_k_weights", top_k_weights)
        if top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"top_k_index has {top_k_index.shape[0]} rows but hidden_states has {hidden_states.shape[0]} tokens"
            )
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(
                f"top_k_weights must have the shape of top_k_index {tuple(top_k_index.shape)}, "
                f"got {tuple(top_k_weights.shape)}"
            )
        check_in_range(
            "top_k_index", top_k_index, 0, self.num_experts - 1, f" (num_experts={self.num_experts})"
        )
        return fused_moe(
            hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index, self.activation
        )


class MixtralSparseMoeBlock(nn.Module):
    """Mixtral's sparse MoE block: softmax router, top-k, renormalise, SwiGLU experts.

    Build it from a ``MixtralConfig`` (``num_local_experts``,
    ``num_experts_per_tok``, ``hidden_size``, ``intermediate_size``,
    ``hidden_act``, ``router_jitter_noise``) or from explicit sizes.  Like
    transformers 5.x, ``forward`` maps [..., H] to hidden states of the same
    shape (no router logits).  In training mode a positive
    ``router_jitter_noise`` scales the input by uniform noise in
    [1 - j, 1 + j], as transformers does (out of place here).

    Example::

        >>> block = MixtralSparseMoeBlock(hidden_size=32, intermediate_size=48, num_experts=8, top_k=2)
        >>> block(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        config=None,
        *,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        hidden_act: str = "silu",
        router_jitter_noise: float = 0.0,
    ):
        super().__init__()
        if config is not None:
            hidden_size = config.hidden_size
            intermediate_size = config.intermediate_size
            num_experts = config.num_local_experts
            top_k = config.num_experts_per_tok
            hidden_act = getattr(config, "hidden_act", hidden_act)
            router_jitter_noise = getattr(config, "router_jitter_noise", router_jitter_noise) or 0.0
        sizes = {}
        for name, v in (
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_experts", num_experts),
            ("top_k", top_k),
        ):
            # None is the "not given" default: a missing value, not a value of the wrong kind.
            if v is None:
                raise ValueError(f"{name} must be given, as an argument or through config")
            sizes[name] = check_int(name, v, 1)
        hidden_size, intermediate_size, num_experts, top_k = sizes.values()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        check_option("hidden_act", hidden_act, ACTIVATIONS)
        self.top_k = top_k
        self.jitter_noise = check_real("router_jitter_noise", router_jitter_noise, 0.0)
        self.gate = MoeTopKRouter(hidden_size, num_experts, top_k)
        self.experts = MoeExperts(hidden_size, intermediate_size, num_experts, hidden_act)
        self.reset_parameters()

    def reset_parameters(self):
        # Fan-in scaled normals keep logits and activations O(1) at any size.
        H, inter = self.experts.hidden_dim, self.experts.intermediate_dim
        nn.init.normal_(self.gate.weight, std=1.0 / math.sqrt(H))
        nn.init.normal_(self.experts.gate_up_proj, std=1.0 / math.sqrt(H))
        nn.init.normal_(self.experts.down_proj, std=1.0 / math.sqrt(inter))

    def forward(self, hidden_states: Tensor) -> Tensor:
        # First: the jitter below would fail on an integer tensor with a less useful message.
        check_features(
            "hidden_states",
            hidden_states,
            "the module's hidden_size",
            self.experts.hidden_dim,
            like=("gate.weight", self.gate.weight),
        )
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.gate(flat)
        return self.experts(flat, ids, weights).view(shape)

    @classmethod
    def from_mixtral(cls, block) -> MixtralSparseMoeBlock:
        """A block holding copies of a transformers Mixtral block's weights (dtype and device kept).

        The activation comes from :func:`mixtral_activation`: SiLU or the
        exact GELU, in either layout; any other is an error.
        """
        w_router, w_gate_up, w_down = from_mixtral(block)
        E, two_i, H = w_gate_up.shape
        act = mixtral_activation(block)
        top_k = getattr(block, "top_k", None)
        if top_k is None:
            raise TypeError(f"block must have .top_k like a Mixtral MoE block, got {type(block).__name__}")
        ours = cls(hidden_size=H, intermediate_size=two_i // 2, num_experts=E, top_k=top_k, hidden_act=act)
        ours.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        ours.to(device=w_gate_up.device, dtype=w_gate_up.dtype)
        with torch.no_grad():
            ours.gate.weight.copy_(w_router)
            ours.experts.gate_up_proj.copy_(w_gate_up)
            ours.experts.down_proj.copy_(w_down)
        return ours


def _activation_name(act_fn, where: str) -> str:
    """``"silu"`` or ``"gelu"`` for a module or function computing SiLU or the exact GELU.

    Decided by evaluating it in float64, not by its class name: transformers
    has several classes for each activation across versions, and the tanh
    GELU or quick GELU would pass a name test while computing something else.
    """
    x = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = act_fn(x)
    except Exception as exc:  # a module that cannot run on a CPU float64 tensor
        raise ValueError(f"{where} ({type(act_fn).__name__}) could not be evaluated: {exc}") from exc
    for name, f in (("silu", F.silu), ("gelu", F.gelu)):
        if isinstance(y, Tensor) and y.shape == x.shape and torch.allclose(y, f(x), rtol=0, atol=1e-12):
            return name
    raise ValueError(
        f"{where} ({type(act_fn).__name__}) is neither SiLU nor the exact GELU; "
        "only 'silu' and 'gelu' experts are supported"
    )


def mixtral_activation(block) -> str:
    """The expert activation of a transformers Mixtral block: ``"silu"`` or ``"gelu"``.

    Reads ``experts.act_fn`` (transformers 5.x) or ``experts[i].act_fn``
    (4.x; all experts must agree), then ``experts.config.hidden_act``;
    ``"silu"`` (Mixtral's) when the block names none.  Anything but SiLU
    or the exact GELU is an error.

    Example::

        >>> mixtral_activation(hf_block)
        'silu'
    """
    experts = getattr(block, "experts", None)
    if experts is None:
        # Without this, any object would read as a block that names no activation: "silu".
        raise TypeError(f"block must have .experts like a Mixtral MoE block, got {type(block).__name__}")
    if isinstance(experts, (nn.ModuleList, list, tuple)):
        acts = [
            (f"block.experts[{i}].act_fn", m.act_fn) for i, m in enumerate(experts) if hasattr(m, "act_fn")
        ]
        names = {_activation_name(fn, where) for where, fn in acts}
        if len(names) > 1:
            raise ValueError(f"block.experts use different activations {sorted(names)}; one is supported")
        return names.pop() if names else "silu"
    if hasattr(experts, "act_fn"):
        return _activation_name(experts.act_fn, "block.experts.act_fn")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ("silu", "gelu"):
        raise ValueError(f"block.experts.config.hidden_act must be 'silu' or 'gelu', got {act!r}")
    return act


def from_mixtral(block) -> tuple[Tensor, Tensor, Tensor]:
    """Convert a transformers ``MixtralSparseMoeBlock``'s weights to (w_router, w_gate_up, w_down).

    Returns detached tensors (sharing the block's storage where no
    conversion was needed): w_router [E, H], w_gate_up [E, 2I, H] (gate
    rows first), w_down [E, H, I].  Handles:

    * transformers 5.x: ``gate.weight``, ``experts.gate_up_proj`` and
      ``experts.down_proj`` (also the variants flagged ``is_transposed``,
      stored [E, H, 2I] / [E, I, H], and ``is_concatenated=False``, whose
      gate and up rows alternate);
    * transformers 4.x: ``gate`` an ``nn.Linear`` and ``experts`` a list of
      modules with ``w1`` (gate), ``w3`` (up) and ``w2`` (down) linears.

    Example::

        >>> w_router, w_gate_up, w_down = from_mixtral(hf_block)
    """
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    if gate is None or experts is None or not isinstance(getattr(gate, "weight", None), Tensor):
        raise TypeError(
            f"block must have .gate.weight and .experts like a Mixtral MoE block, got {type(block).__name__}"
        )
    w_router = gate.weight.detach()
    if hasattr(experts, "gate_up_proj"):
        w_gate_up, w_down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):
            w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
        if not getattr(experts, "is_concatenated", True):
            w_gate_up = torch.cat([w_gate_up[:, 0::2], w_gate_up[:, 1::2]], dim=1)
        return w_router, w_gate_up.contiguous(), w_down.contiguous()
    if isinstance(experts, (nn.ModuleList, list, tuple)) and all(hasattr(m, "w1") for m in experts):
        w_gate_up = torch.stack([torch.cat([m.w1.weight, m.w3.weight], 0) for m in experts]).detach()
        w_down = torch.stack([m.w2.weight for m in experts]).detach()
        return w_router, w_gate_up, w_down
    raise TypeError(
        "block.experts has neither the fused gate_up_proj/down_proj tensors nor per-expert w1/w2/w3 linears"
    )
