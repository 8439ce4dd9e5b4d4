"""Hugging Face transformers models on frontiers_fast's kernels.

Two independent hooks live here:

* Mamba: :func:`kernelize` swaps a model's ``MambaMixer`` layers (below).
* MoE experts: importing this module registers the experts implementation
  ``"frontiers_fast"`` with transformers 5.x (see
  :func:`register_experts_implementation`), after which
  ``model.set_experts_implementation("frontiers_fast")`` or
  ``from_pretrained(..., experts_implementation="frontiers_fast")`` runs the
  experts of any model whose experts module holds the fused 3-D tensors
  (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], or their
  ``is_transposed`` / interleaved variants) on :func:`frontiers_fast.fused_moe`.

:func:`kernelize` replaces each ``transformers`` ``MambaMixer`` of a model by
a :class:`FastMambaMixer`, which holds the *same* parameter objects (and
submodules), so the model's state dict, its optimizer's parameters and its
tied weights are untouched, and runs the layer on frontiers_fast's ops:
:class:`frontiers_fast.nn.Mamba`'s memory-lean forward and backward for
full sequences (training, prefill) and the decoding ops for one-token steps.
``model(...)``, ``model.generate(...)`` and training then run on the kernels.

Written against transformers 5.x, whose ``MambaMixer.forward`` is called as
``mixer(hidden_states, cache=cache, attention_mask=attention_mask)`` with a
``transformers.Cache`` whose linear-attention layers hold a conv state
[batch, d_inner, d_conv] and a recurrent state [batch, d_inner, d_state]
per layer (``get_conv_state`` / ``update_conv_state`` /
``get_recurrent_state`` / ``update_recurrent_state``).

Example::

    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> model = kernelize(MambaForCausalLM(MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100)))
    >>> model.generate(torch.randint(0, 100, (1, 8)), max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 12])
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOATS, check_dims, check_same_device, check_shape
from ..nn.moe import _gated_activation, _standard_layout
from ..nn.ssm import Mamba
from ..ops.moe import fused_moe

try:
    from transformers.models.mamba.modeling_mamba import MambaMixer as _HFMambaMixer
except ImportError as exc:  # pragma: no cover - the module is only imported by people who have transformers
    raise ImportError(
        "frontiers_fast.integrations.transformers needs the transformers package (pip install transformers)"
    ) from exc

_LOOKED_FOR = f"{_HFMambaMixer.__module__}.{_HFMambaMixer.__qualname__}"
_ACTIVATIONS = ("silu", "swish")  # what the kernels fuse after the convolution


def _unsupported(mixer) -> str | None:
    """Why ``mixer`` cannot run on the kernels, or None if it can."""
    if type(mixer) is not _HFMambaMixer:
        # A subclass may change the math (FalconMamba normalises B, C and dt): leave it alone.
        return f"{type(mixer).__name__} is a subclass of MambaMixer, whose forward may differ"
    if mixer.activation not in _ACTIVATIONS:
        return f"its activation {mixer.activation!r} is not one of {_ACTIVATIONS}"
    conv = mixer.conv1d
    d_inner, width = mixer.intermediate_size, mixer.conv_kernel_size
    standard = (
        conv.groups == d_inner
        and conv.in_channels == conv.out_channels == d_inner
        and conv.kernel_size == (width,)
        and conv.stride == (1,)
        and conv.dilation == (1,)
        and conv.padding == (width - 1,)
    )
    if not standard:
        return "its conv1d is not the depthwise causal convolution MambaMixer builds"
    if mixer.A_log.shape != (d_inner, mixer.ssm_state_size) or mixer.D.shape != (d_inner,):
        return f"its A_log {list(mixer.A_log.shape)} or D {list(mixer.D.shape)} has an unexpected shape"
    if mixer.dt_proj.bias is None:
        return "its dt_proj has no bias"
    return None


class FastMambaMixer(Mamba):
    """A transformers ``MambaMixer`` on frontiers_fast's kernels, sharing the original's parameters.

    Built from a mixer by :func:`kernelize`; it holds the mixer's own
    submodules and parameters (no copy) and its plain attributes
    (``layer_idx``, ``config``, ...), so its state dict has the same keys
    and tensors.  Its :meth:`forward` takes what ``MambaMixer.forward``
    takes.  As a :class:`frontiers_fast.nn.Mamba`, it also has ``step``
    and mamba_ssm's ``inference_params`` through :meth:`mamba_forward`.

    Args:
        mixer: a ``transformers.models.mamba.modeling_mamba.MambaMixer``.
    """

    def __init__(self, mixer):
        if not isinstance(mixer, _HFMambaMixer):
            raise TypeError(f"mixer must be a transformers MambaMixer, got {type(mixer).__name__}")
        why = _unsupported(mixer)
        if why is not None:
            raise ValueError(f"mixer cannot run on frontiers_fast's kernels: {why}")
        nn.Module.__init__(self)
        # The very objects, in the mixer's order: named_parameters() (and so an
        # optimizer built before or after kernelize) sees the same list.
        self._parameters.update(mixer._parameters)
        self._buffers.update(mixer._buffers)
        self._modules.update(mixer._modules)
        for name, value in vars(mixer).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.train(mixer.training)
        # nn.Mamba's names for the sizes.
        self.d_model, self.d_state, self.d_conv = (
            mixer.hidden_size,
            mixer.ssm_state_size,
            mixer.conv_kernel_size,
        )
        self.d_inner, self.dt_rank = mixer.intermediate_size, mixer.time_step_rank

    def mamba_forward(self, hidden_states, inference_params=None):
        """:meth:`frontiers_fast.nn.Mamba.forward` (mamba_ssm's calling convention)."""
        return Mamba.forward(self, hidden_states, inference_params)

    @staticmethod
    def _check_mask(attention_mask, batch, L, device):
        """transformers' padding mask: a bool, integer or floating [batch, L] tensor (1 keeps a token)."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
            )
        if attention_mask.is_complex():
            raise TypeError(
                f"attention_mask must be a bool, integer or floating tensor, got {attention_mask.dtype}"
            )
        check_dims("attention_mask", attention_mask, 2, "[batch, L]")
        check_shape("attention_mask", attention_mask, (batch, L), " ([batch, L], as hidden_states)")
        check_same_device("attention_mask", attention_mask, "hidden_states", device)
        return attention_mask

    def forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
        """[batch, L, d_model] -> [batch, L, d_model], as transformers' ``MambaMixer.forward``.

        Args:
            hidden_states: [batch, L, d_model], L >= 1.
            cache: None, or the model's ``transformers.Cache``; this layer's
                states (``layer_idx``) are read and updated in place as
                ``MambaMixer`` does.  With a cache, a call with no earlier
                state is a prefill; one token after a prefill is a decoding
                step (``causal_conv1d_update``, ``selective_state_update``);
                more tokens after a prefill continue from both states (the
                reference mixer restarts its scan from zero there).
            attention_mask: None or [batch, L] (1 keeps a token, 0 is
                padding): zeroes the padding in the layer's input and in the
                convolution's output, as ``MambaMixer`` does.
            cache_params: the deprecated name of ``cache``.
            **kwargs: accepted and unused, as ``MambaMixer`` (which hands them
                to its convolution, whose PyTorch path ignores them).

        Example::

            >>> y = mixer(torch.randn(2, 10, mixer.d_model))  # mixer = FastMambaMixer(...) from kernelize
        """
        if cache_params is not None:
            if cache is not None:
                raise ValueError(
                    "cache and cache_params (its deprecated name) were both given; pass cache only"
                )
            cache = cache_params
        self._check_input("hidden_states", hidden_states, 3, "[batch, L, d_model]")
        batch, L, _ = hidden_states.shape
        if L == 0:
            raise ValueError("hidden_states must have at least one time step (L >= 1), got L=0")
        if cache is not None and not hasattr(cache, "get_conv_state"):
            raise TypeError(
                f"cache must be a transformers Cache with linear-attention layers, got {type(cache).__name__}"
            )
        mask = self._check_mask(attention_mask, batch, L, hidden_states.device)
        dtype = hidden_states.dtype
        conv_state = ssm_state = None
        if cache is not None:
            # None until this layer has seen a first chunk (and after a reset).
            conv_state = cache.get_conv_state(self.layer_idx)
            ssm_state = cache.get_recurrent_state(self.layer_idx)
        if mask is not None:
            hidden_states = (hidden_states * mask.unsqueeze(-1)).to(dtype)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # [batch, 2 d_inner, L]
        if (
            conv_state is not None
            and ssm_state is not None
            and L == 1
            and not cache.is_recording_past(self.layer_idx)
        ):
            y = self._step_inner(xz[..., 0], conv_state, ssm_state, None if mask is None else mask[:, :1])
            return self.out_proj(y.unsqueeze(1).to(dtype))
        conv_init = ssm_init = None
        if cache is not None:
            # transformers' own bookkeeping stores the conv inputs (lazily allocating the state,
            # padding a short prefill, recording the past when asked) and hands back the inputs
            # with the context before them: their last d_conv - 1 columns before this chunk
            # are the convolution's initial states.
            full = cache.update_conv_state(
                xz[:, : self.d_inner], self.layer_idx, conv_kernel_size=self.d_conv
            )
            if conv_state is not None and self.d_conv > 1:
                context = full[..., : full.shape[-1] - L]
                conv_init = F.pad(context, (max(0, self.d_conv - 1 - context.shape[-1]), 0))
                # A copy: the cache may later change the buffer in place (reset), the backward reads it.
                conv_init = conv_init[..., conv_init.shape[-1] - (self.d_conv - 1) :].clone()
            if ssm_state is not None:
                ssm_init = ssm_state.clone()  # the cache is overwritten below, the backward reads it
        y, _, last = self._mix(xz, mask, conv_init, ssm_init)
        if cache is not None:
            with torch.no_grad():
                cache.update_recurrent_state(last, self.layer_idx)
        return self.out_proj(y.transpose(1, 2).to(dtype))


def kernelize(model):
    """Run a transformers model's Mamba layers on frontiers_fast's kernels, in place.

    Every ``transformers`` ``MambaMixer`` found in ``model.modules()`` is
    replaced by a :class:`FastMambaMixer` holding the same parameter objects
    (nothing is copied: ``data_ptr`` and identity are kept, so optimizers,
    tied weights and ``state_dict`` keys are unchanged).  A mixer the kernels
    cannot run (a subclass such as FalconMamba's, another activation) is left
    as it is, with a warning that names it: it keeps transformers' own path,
    which is the fallback.

    Args:
        model: an ``nn.Module`` (a ``MambaForCausalLM``, ``MambaModel``, or a
            single ``MambaMixer``).

    Returns:
        ``model`` (or, for a bare ``MambaMixer``, its replacement).  A model
        without any ``MambaMixer`` is returned unchanged with a
        ``UserWarning`` that says what was looked for.

    Example::

        >>> model = kernelize(MambaForCausalLM(config))
        >>> loss = model(input_ids, labels=input_ids).loss  # forward and backward on the kernels
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, _HFMambaMixer):
        why = _unsupported(model)
        if why is None:
            return FastMambaMixer(model)
        warnings.warn(
            f"kernelize: the model (a {type(model).__name__}) is left as it is: {why}", stacklevel=2
        )
        return model
    replaced, kept, done = 0, [], 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FastMambaMixer):
                done += 1
            elif isinstance(child, _HFMambaMixer):
                where = f"{parent_name}.{name}" if parent_name else name
                why = _unsupported(child)
                if why is None:
                    setattr(parent, name, FastMambaMixer(child))
                    replaced += 1
                else:
                    kept.append(f"{where} ({why})")
    if kept:
        warnings.warn(
            f"kernelize: {len(kept)} MambaMixer layer(s) keep transformers' own path: " + "; ".join(kept),
            stacklevel=2,
        )
    if not replaced and not kept and not done:
        warnings.warn(
            f"kernelize: {type(model).__name__} holds no supported layer (looked for {_LOOKED_FOR}); "
            "the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
    return model


# ===========================================================================
# MoE experts: the "frontiers_fast" experts implementation
# ===========================================================================
# transformers 5.x keeps a MoE layer's experts in one module (decorated with
# @use_experts_implementation) holding fused expert tensors; its forward
# (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
# looks up the function registered in ExpertsInterface under the name in
# config._experts_implementation and calls it with the module as `self`.
# Routing stays transformers' own: only the experts' math is replaced.

try:
    from transformers.integrations import moe as _hf_moe
except ImportError:  # transformers 4.x: no experts interface (the Mamba part above still works)
    _hf_moe = None

EXPERTS_IMPLEMENTATION = "frontiers_fast"

# experts module -> (what the probe depended on, (activation, interleaved)): the probe runs once a module.
_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refusal(experts, why: str) -> NotImplementedError:
    return NotImplementedError(
        f'experts_implementation="{EXPERTS_IMPLEMENTATION}" cannot run {type(experts).__name__}: {why}; '
        'use experts_implementation="grouped_mm" or "eager" for this model'
    )


def _unsupported_experts(experts) -> str | None:
    """Why ``experts`` is outside what fused_moe computes, or None."""
    if not getattr(experts, "has_gate", True):
        return "its experts have no gate projection (has_gate=False)"
    if getattr(experts, "has_bias", False):
        return "its expert projections have biases (has_bias=True)"
    if getattr(experts, "has_post_expert_norm", False):
        return "it normalises each expert's output (has_post_expert_norm=True)"
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            return f"its {name} is not a 3-D expert tensor (got {type(w).__name__})"
        if w.dtype not in FLOATS:
            return f"its {name} has dtype {w.dtype} (quantised experts are not supported)"
    return None


def _experts_gate(experts, intermediate_size: int) -> tuple[str, bool]:
    """(activation, interleaved) of ``experts._apply_gate``, probed once and kept while it and act_fn stay."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:
        raise _refusal(experts, "it has no _apply_gate (not a @use_experts_implementation experts module)")
    key = (getattr(apply_gate, "__func__", apply_gate), getattr(experts, "act_fn", None), intermediate_size)
    hit = _GATES.get(experts)
    if hit is not None and all(a is b for a, b in zip(hit[0][:2], key[:2])) and hit[0][2] == key[2]:
        return hit[1]
    try:
        found = _gated_activation(apply_gate, intermediate_size, f"{type(experts).__name__}._apply_gate")
    except ValueError as exc:
        raise _refusal(experts, str(exc)) from exc
    _GATES[experts] = (key, found)
    return found


def experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
):
    """The ``"frontiers_fast"`` experts implementation: a transformers experts module on :func:`fused_moe`.

    Called by transformers as the experts module's forward (``self`` is that
    module).  Its ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]
    (or [E, H, 2I] / [E, I, H] when ``is_transposed``; a transposed layout
    is copied to the standard one on every call) feed ``fused_moe``
    directly, so gradients reach them as with transformers' own
    implementations.  The gating (SiLU or exact-GELU gate, halves or
    interleaved columns) is read once from what ``_apply_gate`` computes;
    experts with biases, without a gate, with a post-expert norm, with
    quantised weights or another gating are refused with a
    NotImplementedError that names the module.  The input is cast to the
    experts' dtype and the output back to the input's, as
    ``grouped_mm`` does.  Under expert parallelism, transformers' sentinel
    ids (>= the local E) get weight 0.

    Args:
        hidden_states: [T, H]; top_k_index: [T, k] int ids in [0, E);
        top_k_weights: [T, k] router weights (any float dtype).

    Returns:
        [T, H] in ``hidden_states``' dtype.

    Example::

        >>> model.set_experts_implementation("frontiers_fast")  # then model(...) calls this
    """
    why = _unsupported_experts(self)
    if why is not None:
        raise _refusal(self, why)
    transposed = bool(getattr(self, "is_transposed", False))
    w_gate_up, w_down = self.gate_up_proj, self.down_proj
    inter = w_down.shape[1] if transposed else w_down.shape[2]
    activation, interleaved = _experts_gate(self, inter)
    w_gate_up, w_down = _standard_layout(w_gate_up, w_down, transposed, interleaved)
    E, two_i, H = w_gate_up.shape
    if H != hidden_states.shape[-1] or two_i != 2 * inter or tuple(w_down.shape) != (E, H, inter):
        stored = "[E, H, 2I] and [E, I, H]" if transposed else "[E, 2I, H] and [E, H, I]"
        raise ValueError(
            f"{type(self).__name__}.gate_up_proj {list(self.gate_up_proj.shape)} and down_proj "
            f"{list(self.down_proj.shape)} must be {stored} (is_transposed={transposed}) "
            f"with H={hidden_states.shape[-1]} from hidden_states"
        )
    if getattr(self, "_is_expert_parallel", False):
        # transformers marks the slots routed to another rank's experts with ids >= the local E.
        sentinel = top_k_index >= E
        top_k_index = top_k_index.clamp(max=E - 1)
        top_k_weights = top_k_weights.masked_fill(sentinel, 0.0)
    out = fused_moe(
        hidden_states.to(w_gate_up.dtype),
        w_gate_up.contiguous(),
        w_down.contiguous(),
        top_k_weights,
        top_k_index,
        activation,
    )
    return out.to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Register ``"frontiers_fast"`` in transformers' experts interface; idempotent.  Returns the name.

    Importing this module calls it already, so this is only needed after
    something else removed the entry.  It registers :func:`experts_forward`
    class-wide (``transformers.integrations.moe.ExpertsInterface.register``),
    so every model built afterwards, or switched with
    ``set_experts_implementation``, can select it.  Needs transformers 5.x.

    Example::

        >>> register_experts_implementation()
        'frontiers_fast'
        >>> model.set_experts_implementation("frontiers_fast")
    """
    if _hf_moe is None or not hasattr(_hf_moe, "ExpertsInterface"):
        import transformers

        raise ImportError(
            "the frontiers_fast experts implementation needs transformers 5.x "
            f"(transformers.integrations.moe.ExpertsInterface); this is transformers {transformers.__version__}"
        )
    _hf_moe.ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
    return EXPERTS_IMPLEMENTATION


if _hf_moe is not None and hasattr(_hf_moe, "ExpertsInterface"):
    register_experts_implementation()


__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "FastMambaMixer",
    "experts_forward",
    "kernelize",
    "register_experts_implementation",
]
