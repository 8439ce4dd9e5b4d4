"""Drop-ins for transformers' sparse MoE blocks on the fused MoE ops.

Three blocks, each with the parameter names and shapes of transformers 5.x
(so a transformers block's ``state_dict`` loads strictly) and its forward
convention ([..., H] in, hidden states of the same shape out, no router
logits):

* :class:`MixtralSparseMoeBlock`: softmax router, top-k, renormalised.
* :class:`Qwen3MoeSparseMoeBlock`: softmax router, top-k, renormalised only
  when ``norm_topk_prob``.
* :class:`DeepseekV3MoE`: sigmoid router whose choice adds
  ``e_score_correction_bias`` and keeps the ``topk_group`` best of
  ``n_group`` expert groups; weights optionally renormalised, times
  ``routed_scaling_factor``; plus an always-on shared gated MLP.

Their parts, shared by all three:

  gate.weight                    [E, H]      router (:class:`MoeTopKRouter`)
  gate.e_score_correction_bias   [E]         buffer, DeepSeek-V3 only
  experts.gate_up_proj           [E, 2I, H]  gate rows first, then up rows (:class:`MoeExperts`)
  experts.down_proj              [E, H, I]
  shared_experts.{gate,up}_proj  [I_s, H]    DeepSeek-V3 only (:class:`GatedMLP`)
  shared_experts.down_proj       [H, I_s]

:func:`from_mixtral` converts a block in either transformers layout (the fused
5.x tensors or the 4.x per-expert ``w1``/``w2``/``w3`` linears) to the three
routed tensors, and :func:`mixtral_activation` reads its activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    acc_dtype,
    check_bool,
    check_dims,
    check_features,
    check_in_range,
    check_index_tensor,
    check_int,
    check_option,
    check_real,
    check_same_device,
    check_tensor,
)
from ..ops.moe import ACTIVATIONS, SCORINGS, fused_moe, moe_route
from ..reference.moe import activation_fn

__all__ = [
    "MixtralSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "DeepseekV3MoE",
    "MoeTopKRouter",
    "MoeExperts",
    "GatedMLP",
    "from_mixtral",
    "mixtral_activation",
]


def _fan_in_normal_(w: Tensor) -> None:
    # Fan-in scaled normals keep logits and activations O(1) at any size; the fan-in is the last dim
    # for [out, in] linears and for the [E, out, in] expert stacks alike.
    nn.init.normal_(w, std=1.0 / math.sqrt(max(1, w.shape[-1])))


def _check_groups(num_experts: int, top_k: int, n_group, topk_group) -> tuple[int | None, int | None]:
    """DeepSeek-V3's grouped top-k settings, checked when a router is built (not at its first call)."""
    if (n_group is None) != (topk_group is None):
        raise ValueError(
            f"n_group and topk_group must be given together, got n_group={n_group}, topk_group={topk_group}"
        )
    if n_group is None:
        return None, None
    n_group = check_int("n_group", n_group, 1, num_experts, why=f" (num_experts={num_experts})")
    if num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
    topk_group = check_int("topk_group", topk_group, 1, n_group, why=f" (n_group={n_group})")
    kept = topk_group * (num_experts // n_group)
    if top_k > kept:
        raise ValueError(
            f"top_k={top_k} exceeds the {kept} experts of the topk_group={topk_group} groups kept "
            f"out of n_group={n_group} (num_experts={num_experts})"
        )
    return n_group, topk_group


class MoeTopKRouter(nn.Module):
    """Top-k router: ``forward(x [..., H]) -> (logits [T, E], weights [T, k] float32, ids [T, k] int32)``.

    The defaults are Mixtral's (softmax, renormalised).  The keywords cover
    the other transformers routers, through :func:`~frontiers_fast.ops.moe.moe_route`:

    * ``renormalize=False``: Qwen3-MoE with ``norm_topk_prob=False``;
    * ``scoring="sigmoid"``, ``correction_bias=True`` (adds the
      ``e_score_correction_bias`` [E] buffer, zeros, no gradient; it steers
      the choice only), ``n_group``/``topk_group`` and ``scaling``:
      DeepSeek-V3's router, with ``float32_logits=True`` as DeepSeek-V3
      computes its logits in float32 whatever the model's dtype (float64
      stays float64).

    The ids are int32, where transformers' routers return int64: call
    ``ids.long()`` before feeding them to code that one-hot encodes them.
    Like :class:`MoeExperts` (and transformers' parts), it is built
    uninitialised: load a state dict or call :meth:`reset_parameters`.

    Example::

        >>> router = MoeTopKRouter(16, num_experts=8, top_k=2)
        >>> router.reset_parameters()
        >>> logits, weights, ids = router(torch.randn(5, 16))
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
        scaling: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        correction_bias: bool = False,
        float32_logits: bool = False,
    ):
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, 1)
        num_experts = check_int("num_experts", num_experts, 1)
        top_k = check_int("top_k", top_k, 1, num_experts, why=f" (num_experts={num_experts})")
        self.top_k, self.num_experts, self.hidden_dim = top_k, num_experts, hidden_size
        self.scoring = check_option("scoring", scoring, SCORINGS)
        self.renormalize = check_bool("renormalize", renormalize)
        self.scaling = check_real("scaling", scaling)
        self.n_group, self.topk_group = _check_groups(num_experts, top_k, n_group, topk_group)
        self.float32_logits = check_bool("float32_logits", float32_logits)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if check_bool("correction_bias", correction_bias):
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

    def reset_parameters(self):
        _fan_in_normal_(self.weight)
        if self.e_score_correction_bias is not None:
            with torch.no_grad():
                self.e_score_correction_bias.zero_()

    def forward(self, hidden_states: Tensor):
        # Before the reshape: a wrong width whose size divides evenly would otherwise be
        # silently regrouped into rows of hidden_size.  With float32 logits the input keeps
        # its own dtype (DeepSeek-V3 keeps its router in float32 in a bf16 model).
        like = None if self.float32_logits else ("weight", self.weight)
        check_features("hidden_states", hidden_states, "the module's hidden_size", self.hidden_dim, like=like)
        if self.float32_logits:
            check_same_device("hidden_states", hidden_states, "weight", self.weight.device)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.float32_logits:
            dt = acc_dtype(hidden_states.dtype)
            logits = F.linear(hidden_states.to(dt), self.weight.to(dt))
        else:
            logits = F.linear(hidden_states, self.weight)
        bias = self.e_score_correction_bias
        if bias is not None:
            bias = bias.to(logits.dtype)
        weights, ids = moe_route(
            logits,
            self.top_k,
            self.scoring,
            self.renormalize,
            bias,
            self.n_group,
            self.topk_group,
            self.scaling,
        )
        return logits, weights, ids


def check_expert_inputs(hidden_states, top_k_index, top_k_weights, gate_up_proj, num_experts, what=""):
    """The checks of an experts module's ``forward(hidden_states, top_k_index, top_k_weights)``.

    Under the module's own argument names (``fused_moe`` would name x, ids and
    weights); ``gate_up_proj`` [E, 2I, H] gives H, ``num_experts`` the id range
    (``what`` is added to its message).  Shared by :class:`MoeExperts` and the
    expert-parallel shard.
    """
    check_features(
        "hidden_states",
        hidden_states,
        "the module's hidden_size",
        gate_up_proj.shape[-1],
        like=("gate_up_proj", gate_up_proj),
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
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")
    check_in_range("top_k_index", top_k_index, 0, num_experts - 1, what or f" (num_experts={num_experts})")


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

    def reset_parameters(self):
        _fan_in_normal_(self.gate_up_proj)
        _fan_in_normal_(self.down_proj)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        check_expert_inputs(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.num_experts)
        return fused_moe(
            hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index, self.activation
        )


class GatedMLP(nn.Module):
    """A dense gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``: DeepSeek-V3's shared experts.

    Parameter names are transformers' ``DeepseekV3MLP``'s: ``gate_proj.weight``
    and ``up_proj.weight`` [I, H], ``down_proj.weight`` [H, I], no biases.
    ``forward`` maps [..., H] to [..., H].

    Example::

        >>> GatedMLP(16, 32)(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, 1)
        # 0 is allowed: transformers builds such a (zero-output) MLP for n_shared_experts=0.
        intermediate_size = check_int("intermediate_size", intermediate_size, 0)
        self.activation = check_option("activation", activation, ACTIVATIONS)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def reset_parameters(self):
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            _fan_in_normal_(lin.weight)

    def forward(self, x: Tensor) -> Tensor:
        like = ("gate_proj.weight", self.gate_proj.weight)
        check_features("x", x, "the module's hidden_size", self.hidden_size, like=like)
        return self.down_proj(activation_fn(self.activation)(self.gate_proj(x)) * self.up_proj(x))


def _settings(config, kind: str, given: dict, required: dict, optional: dict) -> dict:
    """A block's constructor arguments: from ``config`` when one is given, else the keywords ``given``.

    ``required`` and ``optional`` map an argument to its config attribute.  A
    config without a required attribute is refused, naming it; an optional
    attribute that is missing or None keeps the keyword's value.  The sizes
    in ``required`` must then be given and be ints >= 1, and ``top_k`` at
    most ``num_experts``.
    """
    out = dict(given)
    if config is not None:
        for name, attr in required.items():
            if not hasattr(config, attr):
                raise TypeError(
                    f"config must have .{attr} (for {name}) like a transformers {kind}, "
                    f"got {type(config).__name__} without it"
                )
            out[name] = getattr(config, attr)
        for name, attr in optional.items():
            v = getattr(config, attr, None)
            if v is not None:
                out[name] = v
    for name in required:
        # None is the "not given" default: a missing value, not a value of the wrong kind.
        if out[name] is None:
            raise ValueError(f"{name} must be given, as an argument or through config")
        out[name] = check_int(name, out[name], 1)
    if out["top_k"] > out["num_experts"]:
        raise ValueError(f"top_k={out['top_k']} must be <= num_experts={out['num_experts']}")
    return out


class _SparseMoeBlock(nn.Module):
    """What the sparse blocks share: a router ``gate`` picks top-k of the ``experts`` for each token."""

    def _build(self, s: dict, **route):
        check_option("hidden_act", s["hidden_act"], ACTIVATIONS)
        self.top_k = s["top_k"]
        self.gate = MoeTopKRouter(s["hidden_size"], s["num_experts"], s["top_k"], **route)
        self.experts = MoeExperts(s["hidden_size"], s["intermediate_size"], s["num_experts"], s["hidden_act"])

    def reset_parameters(self):
        self.gate.reset_parameters()
        self.experts.reset_parameters()

    def _check_input(self, hidden_states: Tensor) -> None:
        check_features(
            "hidden_states",
            hidden_states,
            "the module's hidden_size",
            self.experts.hidden_dim,
            like=("experts.gate_up_proj", self.experts.gate_up_proj),
        )

    def _routed(self, hidden_states: Tensor) -> Tensor:
        """[..., H] -> [..., H]: the routed experts' weighted sum for every token."""
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.gate(flat)
        return self.experts(flat, ids, weights).view(shape)


class MixtralSparseMoeBlock(_SparseMoeBlock):
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
        s = _settings(
            config,
            "MixtralConfig",
            dict(
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_experts=num_experts,
                top_k=top_k,
                hidden_act=hidden_act,
                router_jitter_noise=router_jitter_noise,
            ),
            required=dict(
                hidden_size="hidden_size",
                intermediate_size="intermediate_size",
                num_experts="num_local_experts",
                top_k="num_experts_per_tok",
            ),
            optional=dict(hidden_act="hidden_act", router_jitter_noise="router_jitter_noise"),
        )
        self.jitter_noise = check_real("router_jitter_noise", s["router_jitter_noise"], 0.0)
        self._build(s)
        self.reset_parameters()

    def forward(self, hidden_states: Tensor) -> Tensor:
        # First: the jitter below would fail on an integer tensor with a less useful message.
        self._check_input(hidden_states)
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        return self._routed(hidden_states)

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


class Qwen3MoeSparseMoeBlock(_SparseMoeBlock):
    """Qwen3-MoE's sparse block: softmax router, top-k, renormalised only if ``norm_topk_prob``.

    Build it from a ``Qwen3MoeConfig`` (``hidden_size``,
    ``moe_intermediate_size``, ``num_experts``, ``num_experts_per_tok``,
    ``hidden_act``, ``norm_topk_prob``) or from explicit sizes
    (``intermediate_size`` is the per-expert width, transformers'
    ``moe_intermediate_size``).  As in transformers 5.x, ``forward`` maps
    [..., H] to hidden states of the same shape (no router logits).  The
    router weights stay in float32 in a half-precision block (transformers
    rounds them to the model's dtype).

    Example::

        >>> block = Qwen3MoeSparseMoeBlock(hidden_size=32, intermediate_size=16, num_experts=8, top_k=4)
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
        norm_topk_prob: bool = False,
    ):
        super().__init__()
        s = _settings(
            config,
            "Qwen3MoeConfig",
            dict(
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_experts=num_experts,
                top_k=top_k,
                hidden_act=hidden_act,
                norm_topk_prob=norm_topk_prob,
            ),
            required=dict(
                hidden_size="hidden_size",
                intermediate_size="moe_intermediate_size",
                num_experts="num_experts",
                top_k="num_experts_per_tok",
            ),
            optional=dict(hidden_act="hidden_act", norm_topk_prob="norm_topk_prob"),
        )
        self.norm_topk_prob = check_bool("norm_topk_prob", s["norm_topk_prob"])
        self._build(s, renormalize=self.norm_topk_prob)
        self.reset_parameters()

    def forward(self, hidden_states: Tensor) -> Tensor:
        self._check_input(hidden_states)
        return self._routed(hidden_states)


class DeepseekV3MoE(_SparseMoeBlock):
    """DeepSeek-V3's MoE block: grouped sigmoid routing with a correction bias, plus shared experts.

    Each token scores the experts with ``sigmoid(x W_gate^T)`` (in float32),
    chooses on ``scores + gate.e_score_correction_bias`` within the
    ``topk_group`` best of ``n_group`` groups (a group ranks by its two best
    biased scores), weighs its ``top_k`` experts by their unbiased scores
    (renormalised when ``norm_topk_prob``) times ``routed_scaling_factor``,
    and adds ``shared_experts(x)``, a dense gated MLP of width
    ``intermediate_size * n_shared_experts``.

    Build it from a ``DeepseekV3Config`` (``hidden_size``,
    ``moe_intermediate_size``, ``n_routed_experts``, ``num_experts_per_tok``,
    ``n_shared_experts``, ``n_group``, ``topk_group``,
    ``routed_scaling_factor``, ``norm_topk_prob``, ``hidden_act``) or from
    explicit sizes; the defaults of the others are DeepSeek-V3's, except
    grouping, which is off unless ``n_group`` and ``topk_group`` are given.
    As in transformers 5.x, ``forward`` maps [..., H] to hidden states of the
    same shape (no router logits).

    Example::

        >>> block = DeepseekV3MoE(hidden_size=32, intermediate_size=16, num_experts=16, top_k=4,
        ...                       n_group=4, topk_group=2)
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
        n_shared_experts: int = 1,
        n_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 2.5,
        norm_topk_prob: bool = True,
        hidden_act: str = "silu",
    ):
        super().__init__()
        s = _settings(
            config,
            "DeepseekV3Config",
            dict(
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_experts=num_experts,
                top_k=top_k,
                n_shared_experts=n_shared_experts,
                n_group=n_group,
                topk_group=topk_group,
                routed_scaling_factor=routed_scaling_factor,
                norm_topk_prob=norm_topk_prob,
                hidden_act=hidden_act,
            ),
            required=dict(
                hidden_size="hidden_size",
                intermediate_size="moe_intermediate_size",
                num_experts="n_routed_experts",
                top_k="num_experts_per_tok",
            ),
            optional={
                k: k
                for k in (
                    "n_shared_experts",
                    "n_group",
                    "topk_group",
                    "routed_scaling_factor",
                    "norm_topk_prob",
                    "hidden_act",
                )
            },
        )
        self.n_shared_experts = check_int("n_shared_experts", s["n_shared_experts"], 0)
        self.norm_topk_prob = check_bool("norm_topk_prob", s["norm_topk_prob"])
        self.routed_scaling_factor = check_real("routed_scaling_factor", s["routed_scaling_factor"])
        self._build(
            s,
            scoring="sigmoid",
            renormalize=self.norm_topk_prob,
            scaling=self.routed_scaling_factor,
            n_group=s["n_group"],
            topk_group=s["topk_group"],
            correction_bias=True,
            float32_logits=True,
        )
        self.shared_experts = GatedMLP(
            s["hidden_size"], s["intermediate_size"] * self.n_shared_experts, s["hidden_act"]
        )
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.shared_experts.reset_parameters()

    def forward(self, hidden_states: Tensor) -> Tensor:
        self._check_input(hidden_states)
        return self._routed(hidden_states) + self.shared_experts(hidden_states)


def _evaluate(fn, x: Tensor, where: str):
    """``fn(x)`` on a CPU float64 probe, or a ValueError naming ``where`` if it cannot run there."""
    try:
        with torch.no_grad():
            return fn(x)
    except Exception as exc:  # a module that cannot run on a CPU float64 tensor
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise ValueError(f"{where} ({name}) could not be evaluated: {exc}") from exc


def _computes(y, want: Tensor) -> bool:
    return isinstance(y, Tensor) and y.shape == want.shape and torch.allclose(y, want, rtol=0, atol=1e-12)


def _activation_name(act_fn, where: str) -> str:
    """``"silu"`` or ``"gelu"`` for a module or function computing SiLU or the exact GELU.

    Decided by evaluating it in float64, not by its class name: transformers
    has several classes for each activation across versions, and the tanh
    GELU or quick GELU would pass a name test while computing something else.
    """
    x = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    y = _evaluate(act_fn, x, where)
    for name in ACTIVATIONS:
        if _computes(y, activation_fn(name)(x)):
            return name
    raise ValueError(
        f"{where} ({type(act_fn).__name__}) is neither SiLU nor the exact GELU; "
        "only 'silu' and 'gelu' experts are supported"
    )


def _gated_activation(apply_gate, intermediate_size: int, where: str) -> tuple[str, bool]:
    """What a gating function of [n, 2I] gate/up projections computes: ``(activation, interleaved)``.

    ``apply_gate`` must compute ``act(gate) * up`` with ``act`` SiLU or the
    exact GELU, the gate being the first I columns and the up the last I
    (``interleaved=False``), or the even and the odd columns
    (``interleaved=True``).  Decided, like :func:`_activation_name`, by
    evaluation in float64; anything else (a clamp, a bias, another
    activation) is a ValueError naming ``where``.
    """
    z = torch.linspace(-6.0, 6.0, 16 * 2 * intermediate_size, dtype=torch.float64)
    z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))].view(16, -1)
    y = _evaluate(apply_gate, z, where)
    splits = {False: (z[:, :intermediate_size], z[:, intermediate_size:]), True: (z[:, 0::2], z[:, 1::2])}
    for name in ACTIVATIONS:
        for interleaved, (gate, up) in splits.items():
            if _computes(y, activation_fn(name)(gate) * up):
                return name, interleaved
    raise ValueError(
        f"{where} does not compute act(gate) * up with act SiLU or the exact GELU "
        "(gate and up as the two halves or the even and odd columns of the gate_up projection); "
        "only those gated experts are supported"
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


def _standard_layout(w_gate_up: Tensor, w_down: Tensor, transposed: bool, interleaved: bool):
    """transformers' fused expert tensors in any of its layouts -> ([E, 2I, H] gate rows first, [E, H, I]).

    ``transposed``: stored [E, H, 2I] and [E, I, H] (``is_transposed``);
    ``interleaved``: gate and up rows alternate (``is_concatenated=False``).
    Autograd flows through: views, plus one copy for the interleaved layout.
    """
    if transposed:
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    if interleaved:
        w_gate_up = torch.cat([w_gate_up[:, 0::2], w_gate_up[:, 1::2]], dim=1)
    return w_gate_up, w_down


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
        w_gate_up, w_down = _standard_layout(
            experts.gate_up_proj.detach(),
            experts.down_proj.detach(),
            getattr(experts, "is_transposed", False),
            not getattr(experts, "is_concatenated", True),
        )
        return w_router, w_gate_up.contiguous(), w_down.contiguous()
    if isinstance(experts, (nn.ModuleList, list, tuple)) and all(hasattr(m, "w1") for m in experts):
        w_gate_up = torch.stack([torch.cat([m.w1.weight, m.w3.weight], 0) for m in experts]).detach()
        w_down = torch.stack([m.w2.weight for m in experts]).detach()
        return w_router, w_gate_up, w_down
    raise TypeError(
        "block.experts has neither the fused gate_up_proj/down_proj tensors nor per-expert w1/w2/w3 linears"
    )
