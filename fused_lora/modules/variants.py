"""The variant axis of the adapted layer: what an adapter computes, as strategy objects (peft's
`LoraVariant`), chosen per adapter.

    LORA   y = x W^T + b + s B A dropout(x)                         (fused_lora.ops.lora / ops.quant)
    DORA   peft's use_dora=True: y = (m / n) (x W^T + s B A x) + b, n_j = ||W_j + s B_j A|| detached
           (fused_lora.ops.dora, at LoRA's cost), the trained magnitude `lora_magnitude_vector`; the
           "default" adapter only, over a 16-bit base

A variant gives the layer its forward for one adapter and its merge / unmerge of the weight; the layer
asks `variant_of(layer, name)`. Adding a variant is one class here (and its op, only if it is fused).

`lora_forward` and `dora_forward` are the layer's computation on x of any leading shape, shared by
FusedLoRALinear and patched peft layers (`peft_compat.patch`), so both compute the same way.

DoRA with dropout (p > 0, training): matched to peft, whose DoRA computes the base term on the dropped
input: y = x W^T + b + (c - 1) (D x) W^T + c s (D x) A^T B^T (not the paper's c (x W^T + s B A D x) + b).
That costs a second GEMM: y = (x - D x) W^T + b + dora_linear(D x) with D drawn by torch's dropout (the
same random stream as peft's nn.Dropout), D x held for backward (M x in). With p = 0 or in eval the single
fused op runs. A fresh adapter (c = 1, B = 0) with dropout in training therefore equals its base to rounding,
not bit for bit ((x - D x) W^T + (D x) W^T is not x W^T rounded); peft's order would be exact with the same two
GEMMs but is not the fused op (README, DoRA).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.dora_norm import weight_norm
from ..core.dropout import seed_for
from ..ops.dora import dora_linear
from ..ops.lora import lora_linear
from .adapter_range import compute_adapter

MAGNITUDE = "lora_magnitude_vector"  # peft's parameter name (and its adapter file key)


def lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float, dropout_p: float, seed: Optional[Tensor] = None, backend: str = "auto",
                 name: str = "default") -> Tensor:
    """The LoRA layer on x of any leading shape: A and B cast to x's dtype (their gradients come back
    in their own; values that dtype cannot hold are refused naming adapter `name`:
    `modules.adapter_range`), the op on x seen as 2-D, with `seed` or a fresh one when there is dropout.
    Shared by FusedLoRALinear and patched peft layers, so both compute the same way."""
    lead = x.shape[:-1]
    A, B = compute_adapter(lora_A, lora_B, scaling, x.dtype, name)  # before any random draw: a refusal draws none
    if seed is None:
        seed = seed_for(dropout_p)
    # math.prod, not -1: with in_features == 0 (or an empty batch) -1 is ambiguous
    y = lora_linear(x.reshape(math.prod(lead), x.shape[-1]), weight, bias, A, B, scaling, dropout_p, seed, backend)
    return y.reshape(*lead, weight.shape[0])


def is_dora(layer: nn.Module, adapter_name: str) -> bool:
    """Whether `adapter_name` on this FusedLoRALinear is a DoRA adapter (only "default" can be)."""
    return adapter_name == "default" and MAGNITUDE in layer._parameters


@torch.no_grad()
def enable_dora(layer: nn.Module) -> None:
    """Give the layer's default adapter a magnitude vector, initialised as peft does: ||W + s B A||
    per output (so the layer starts equal to its LoRA, which B = 0 makes the base), in the
    adapter's dtype."""
    lora_A, lora_B = layer.adapter_weights("default")
    weight = layer.base_weight().detach()
    norm = weight_norm(weight, lora_A, lora_B, layer.adapter_settings("default").scaling)
    layer._parameters[MAGNITUDE] = nn.Parameter(norm.to(lora_A.dtype), requires_grad=lora_A.requires_grad)


def dora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 magnitude: Tensor, scaling: float, dropout_p: float, backend: str, name: str = "default") -> Tensor:
    """peft's DoRA layer on x of any leading shape (weight out x in, in x's dtype; A and B cast to it as
    `lora_forward` casts them): the fused op, or with dropout_p > 0 peft's dropout formula (see the module
    docstring). Shared by FusedLoRALinear and patched peft layers."""
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    A, B = compute_adapter(lora_A, lora_B, scaling, x.dtype, name)
    if x2.shape[0] == 0:  # no rows (an MoE expert without tokens): peft's formula, every gradient zero
        colscale = magnitude / weight_norm(weight, A, B, scaling).to(magnitude.dtype)
        y = (F.linear(x2, weight) + scaling * F.linear(F.linear(x2, A), B)) * colscale.to(x.dtype)
        y = y + bias if bias is not None else y
    elif dropout_p > 0.0:  # peft's formula: the (c - 1) base term on the dropped input
        xd = F.dropout(x2, dropout_p, training=True)
        y = F.linear(x2 - xd, weight, bias) + dora_linear(xd, weight, None, A, B, magnitude, scaling, backend)
    else:
        y = dora_linear(x2, weight, bias, A, B, magnitude, scaling, backend)
    return y.reshape(*lead, weight.shape[0])


@torch.no_grad()
def dora_merged_weight(layer: nn.Module) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """peft's DoRA merge: (c (W + s B A), in W's own layout and dtype; what unmerge needs) with
    n = ||W + s B A|| of the unmerged W and c = m / n. The layer keeps the second item to unmerge:
    n, and the rows j with c_j == 0 with their unmerged W_j (the merge zeroes them: W / c cannot)."""
    delta = layer.delta_weight("default")  # out x in, fp32 / fp64
    weight = layer.base_weight().detach()
    lora_A, lora_B = layer.adapter_weights("default")
    norm = weight_norm(weight, lora_A, lora_B, layer.adapter_settings("default").scaling)
    c = layer._parameters[MAGNITUDE].detach().to(norm.dtype) / norm
    merged = (weight.to(delta.dtype) + delta) * c[:, None].to(delta.dtype)
    lost = (c == 0).nonzero().flatten()
    return layer.base_weight(merged).to(layer.weight.dtype), (norm, lost, weight[lost].clone())


@torch.no_grad()
def dora_unmerged_weight(layer: nn.Module, kept: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """peft's DoRA unmerge: W = W_merged / c - s B A, c = m / n with the n saved at merge; the rows with
    c_j == 0 are put back from the copies saved at merge."""
    norm, lost, rows = kept
    delta = layer.delta_weight("default")
    c = layer._parameters[MAGNITUDE].detach().to(norm.dtype) / norm
    weight = layer.base_weight().detach().to(delta.dtype)
    unmerged = weight / c[:, None].to(delta.dtype) - delta
    unmerged[lost] = rows.to(delta.dtype)
    return layer.base_weight(unmerged).to(layer.weight.dtype)


class LoRAVariant:
    """A plain LoRA adapter (peft's default). A variant answers, for one adapter of a layer: its forward (as the
    active adapter), the trainable tensors it adds beyond A and B and their removal, its merge and unmerge, and
    whether it runs in a mixed batch (only plain LoRA does: the mixed-batch ops compute plain LoRA)."""
    name = "lora"
    merges_alone = False
    in_mixed_batch = True

    def parameters(self, layer, adapter_name: str) -> tuple:
        """The adapter's trainable tensors beyond lora_A and lora_B."""
        return ()

    def delete(self, layer, adapter_name: str) -> None:
        """Remove what `parameters` gives (delete_adapter)."""

    def forward(self, layer, x: Tensor, weight, bias: Optional[Tensor]) -> Tensor:
        """The layer's forward with its active adapter (x, weight, bias as the base gives them)."""
        return layer.base_kind.lora(x, weight, bias, layer.lora_A, layer.lora_B, layer.scaling,
                                    layer.lora_dropout if layer.training else 0.0, None, layer.backend,
                                    layer.active_adapter)

    def merged_weight(self, layer, names: Sequence[str]) -> tuple[Tensor, Optional[tuple]]:
        """(W + sum of s B A over `names`, rounded once to W's dtype; nothing kept to unmerge)."""
        return layer.weight_with_delta(+1, names), None

    def unmerged_weight(self, layer, kept) -> Tensor:
        return layer.weight_with_delta(-1, layer.merged_adapters)


class DoRAVariant(LoRAVariant):
    """peft's DoRA (use_dora=True): a trained magnitude vector, merged alone (W is rescaled, so deltas no longer
    add), not in mixed batches."""
    name = "dora"
    merges_alone = True
    in_mixed_batch = False
    label, flag = "DoRA", "use_dora=True"  # how messages name it

    def parameters(self, layer, adapter_name: str) -> tuple:
        return (layer._parameters[MAGNITUDE],)

    def delete(self, layer, adapter_name: str) -> None:
        layer._parameters.pop(MAGNITUDE, None)

    def forward(self, layer, x: Tensor, weight, bias: Optional[Tensor]) -> Tensor:
        lora_A, lora_B = layer.adapter_weights("default")
        settings = layer.adapter_settings("default")
        return dora_forward(x, weight, bias, lora_A, lora_B, layer._parameters[MAGNITUDE], settings.scaling,
                            settings.lora_dropout if layer.training else 0.0, layer.backend, "default")

    def merged_weight(self, layer, names: Sequence[str]) -> tuple[Tensor, Optional[tuple]]:
        return dora_merged_weight(layer)

    def unmerged_weight(self, layer, kept) -> Tensor:
        return dora_unmerged_weight(layer, kept)


LORA, DORA = LoRAVariant(), DoRAVariant()


def variant_of(layer: nn.Module, adapter_name: str):
    """The variant of `adapter_name` on this FusedLoRALinear: DORA where it holds a magnitude, else LORA."""
    return DORA if is_dora(layer, adapter_name) else LORA


def refuse_in_mixed_batch(layer: nn.Module, used) -> None:
    """A mixed batch (adapter_names) runs adapters whose variant takes part in one (plain LoRA)."""
    refused = [variant_of(layer, name) for name in used if not variant_of(layer, name).in_mixed_batch]
    if refused:
        v = refused[0]
        raise ValueError(f"FusedLoRALinear: adapter_names (several adapters in one batch) is not supported with a "
                         f"{v.label} adapter ({v.flag}); run the {v.label} adapter's samples separately")
