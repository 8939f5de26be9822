"""Symmetry audit: check, on the real model, the symmetries the planned update maps assume.

Every map of :mod:`equiopt.maps` is equivariant under a group (design note section 2): the
row-wise maps under a permutation of the rows, the polar maps under rotations, the centered
maps under the shift ``W -> W + 1 c^T``. That is only worth something when the group is a
symmetry of the network; architectures break such claims quietly (final-logit soft-capping
breaks the LM-head shift, a norm gain breaks a residual rotation, a per-expert scale breaks
the router shift). :func:`audit` builds, for every block the planner recorded
(``plan.blocks``: vocabulary, attention, MLP, MoE, with their symmetries), the group action
the block's map assumes, applies a random element of it to a float64 copy of the model, and
measures the change of the logits, of the loss and of the gradient::

    report = equiopt.audit.audit(model, input_ids)        # input_ids: LongTensor [B, T]
    print(report)                                         # one row per check
    rules = equiopt.audit.downgrade_rules(report)         # e.g. {"lm_head": {"map": "row_norm", "center": False}}
    opt = equiopt.build(model, audit=report)              # those rules, the broken shift dropped from the groups

Groups (``kind`` of a :class:`CheckResult`) and how each is applied:

================== ==========================================================================
``tied_perm``      tied embedding = head: rows permuted, input ids and targets relabelled
``vocab_perm``     token embedding rows permuted, input ids relabelled
``head_perm``      LM-head rows (and bias) permuted, targets relabelled
``row_perm``       rows of another embedding (e.g. positions) permuted; nothing to relabel
``logit_shift``    LM head ``W -> W + 1 c^T``: logits move by one constant per position
``residual_rotation`` residual basis rotated by a Haar ``Q in O(d)``: every reader of the
                   residual ``W -> W Q^T`` (embeddings, q/k/v, MLP/expert in-projections,
                   router, head), every writer ``W -> Q W``, ``b -> Q b`` (o, MLP/expert
                   out-projections and their biases); norm gains are left alone
``neuron_perm``    hidden neurons permuted jointly in every in-projection part (gate and
                   up rows, fused or interleaved, biases) and the out-projection columns;
                   stacked experts get one independent permutation per expert
``neuron_rescale`` gauge of one in-projection part: its row ``i`` (and bias) times ``s_i > 0``,
                   out-projection column ``i`` divided by ``s_i``; run on every part, the
                   verdicts say which parts are linear (informational: no map assumes it;
                   :mod:`equiopt.diagnostics` tracks drift along it)
``vo_rotation``    per kv-head ``R_j in O(head_dim)``: ``V_j -> R_j V_j``, ``O_i -> O_i R_j^T``
                   for the query heads ``i`` sharing kv-head ``j``
``qk_rotation``    per kv-head ``R_j in O(head_dim)`` on the rows of ``Q_i`` and ``K_j``
``qk_rope_rotation`` the same with ``R_j`` restricted to rotations inside the RoPE 2-planes
                   (pairs ``(i, i + hd/2)``, ``rope_pairing="half"``, or ``(2i, 2i+1)``)
``expert_perm``    experts permuted jointly in the router (rows, bias, any per-expert
                   tensor of the router module) and the stacked expert tensors
``router_shift``   router ``W -> W + 1 c^T``
================== ==========================================================================

Each check is measured twice: at the weights as given, and at a *generic point* where every
trainable vector (norm gains, biases) has been perturbed, so that a symmetry which only holds
at a special point (unit gains, zero biases at initialisation) is not reported as exact: the
first optimizer step would break it. The verdict is taken at the generic point:

* ``exact``: error <= ``tol`` (default ``1e3 * eps`` of the audit dtype, 2.2e-13 in float64);
* ``approximate``: error <= ``approx_tol`` (default 1e-6);
* ``broken``: larger. The reason is found by ablation: each suspect (a vector of the block
  set to a uniform value, a soft-capping entry of the config set to None) is neutralised in
  turn and the check re-run; the suspects that restore the symmetry are named;
* ``untested``: the block's structure could not be read (reason given).

The error of a check is the largest of: ``max |logits' - g.logits| / max |logits|``,
``|loss' - loss| / max(1, |loss|)`` and ``max |grad' - g.grad| / max |g.grad|`` over the
acted parameters (gradient equivariance also catches a masked gradient, e.g. an
``nn.Embedding(padding_idx=...)`` row; vocabulary permutations therefore fix the padding
index).

Inputs: token ids ``[B, T]`` (or a mapping with ``input_ids`` and ``labels``), or images
``[B, C, H, W]`` (a float tensor or a mapping with ``pixel_values``: a vision tower; nothing
relabels tokens then). A model without logits (an encoder such as ``BertModel``, a vision
tower) is read out through its last hidden state times a fixed random ``[16, d]`` matrix
(not a model weight: the settings note it), with fixed targets.

The checks act with the blocks the planner traced: the head order of a fused qkv comes from
:attr:`equiopt.blocks.AttentionBlock.head_blocks` (GPT-NeoX's per-head ``[q_h; k_h; v_h]``),
fused / flattened / stacked experts from the layouts, group-limited routing (``n_group``)
keeps the expert groups, and rows indexed by the vocabulary (a tied head's bias, a
``matrix`` weight with one row per token) are permuted with the tokens.

**Relied on** (the ``relied on`` column, ``CheckResult.assumed_by`` / ``.relied``,
:func:`equiopt.verify.relies_on`): the plan needs the symmetry to be *exact* for a planned map
of an acted parameter (its entry's own spec and block group, :meth:`equiopt.Plan.spec` /
:meth:`equiopt.Plan.group_of`), in one of two ways:

* ``projects out``: the map removes the orbit direction from the update -- the centered maps
  of the LM head and of a softmax router and the row shift (``logit_shift``,
  ``router_shift``). Broken, the update loses a real descent direction:
  :func:`downgrade_rules` / :meth:`AuditReport.broken_factors` turn exactly these into planner
  rules (no centering, the shift dropped from the group);
* ``structure``: the check witnesses structure the planner read and the map uses --
  ``vocab_perm`` / ``tied_perm`` / ``head_perm`` (rows are tokens), ``neuron_perm`` (hidden
  neurons, the gate|up pairing), ``vo_rotation`` (the head split of v and o), ``expert_perm``
  (the expert split, router rows to experts). Each holds in every network whose structure is
  read right, whatever its other weights. The map uses it when it is equivariant under the
  factor but not under the orthogonal group of the whole axis (row-wise maps and AdamW: the
  rows are their units), acts per head (``per_head`` polar maps) or per stacked expert.
  Broken, the planner read the structure wrong; no map change repairs that (override the
  layout or role), so no rule is emitted.

Everything else is **informational**: ``residual_rotation`` (norm gains), ``qk_rotation``
(RoPE), ``qk_rope_rotation`` (QK-norm gains, partial rotary), ``neuron_rescale``
(activations) and ``row_perm`` (positions) hold or not depending on weights the plan does
not constrain, and a map equivariant under a group *larger* than the network's (a per-head
polar map under RoPE) is still compatible with it; so is a map of a block whose group does
not claim the symmetry (a sigmoid router has no shift). "No relied-on symmetry broken"
(:meth:`AuditReport.relied_on_broken` empty) is the acceptance criterion of a plan;
``equiopt audit --strict`` exits 1 otherwise.

**Unchecked** (:attr:`AuditReport.unchecked`, a section under the table): every trainable
tensor no measured check acted on, with the reason -- MLA projections (no q/k/v attention
block), ``matrix`` weights in no block (no structure found, low-rank factors, convolution
kernels), vectors no check moves (norm gains: trivial group), tensors of untested checks.

The implementation lives in :mod:`equiopt.verify`; this module re-exports it and is callable:
``equiopt.audit(model, batch)`` is ``equiopt.audit.audit(model, batch)``.
"""

from __future__ import annotations

import sys
import types

from .verify import (
    ARCH_CHOICES,
    INFORMATIONAL_KINDS,
    KINDS,
    SHIFT_KINDS,
    STRUCTURE_KINDS,
    VERDICTS,
    AuditError,
    AuditReport,
    CheckResult,
    add_arguments,
    audit,
    build_audit_model,
    downgrade_rules,
    relies_on,
    run,
)

__all__ = [
    "ARCH_CHOICES",
    "KINDS",
    "SHIFT_KINDS",
    "VERDICTS",
    "AuditError",
    "AuditReport",
    "CheckResult",
    "add_arguments",
    "audit",
    "build_audit_model",
    "downgrade_rules",
    "relies_on",
    "run",
    "STRUCTURE_KINDS",
    "INFORMATIONAL_KINDS",
]


# ``equiopt.audit(model, batch)`` as the issue spells it: the module is callable once the
# package imports it (``from . import audit``); ``equiopt.audit.audit`` is the same function.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> AuditReport:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
