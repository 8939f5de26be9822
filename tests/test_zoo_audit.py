"""Issue #11 item 3: the audit of every zoo architecture (tests/zoo.py) acts with the traced
blocks and groups, reports no relied-on symmetry broken, and lists every trainable tensor it
did not check with the reason.

Expectations written from the architectures (not from the audit's output): GPT-NeoX's fused
qkv is per head ``[q_h; k_h; v_h]``, so a v/o head rotation must act on blocks ``3h + 2``;
MLA (DeepSeek-V3, hand_mla) has no q/k/v-projection attention block, so its projections
are reported unchecked; a sigmoid router's group has no shift, so its ``router_shift`` is
informational; encoders and vision towers are audited through a fixed readout of their last
hidden state, vision towers from ``pixel_values``.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

import equiopt
from equiopt.blocks import AttentionBlock

pytest.importorskip("transformers")

from zoo import NO_STRUCTURE, ZOO, ids_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BY_NAME = {z.name: z for z in ZOO}
SIGMOID = ("deepseek_v3", "hand_flat_sigmoid", "hand_list_sigmoid")
SOFTMAX_ROUTERS = ("olmoe", "gpt_oss", "qwen2_moe", "hand_list_softmax")
VISION = ("vit", "clip_vision", "siglip_vision")
MLA = {"deepseek_v3": r"(q_b_proj|kv_b_proj|o_proj)\.weight$", "hand_mla": r"attn\.(q_b|kv_b|o)\.weight$"}


@functools.cache
def model_and_batch(name):
    z = BY_NAME[name]
    torch.manual_seed(0)
    m = z.build()
    batch = z.batch(m) if z.batch is not None else ids_batch(m, with_labels=False)
    return m, batch


def plan_of(name):
    m, batch = model_and_batch(name)
    # hand-written LMs take positional ids: their default example (input_ids [2, 8]) is used
    return equiopt.plan(m, example=batch if BY_NAME[name].batch is not None else None)


@functools.cache
def report(name):
    m, batch = model_and_batch(name)
    return equiopt.audit(m, batch, plan=plan_of(name))


@pytest.mark.parametrize("name", list(BY_NAME))
def test_zoo_audit(name):
    m, _ = model_and_batch(name)
    r = report(name)
    bad = [(c.kind, c.scope, f"{c.error:.1e}", c.reason) for c in r.relied_on_broken()]
    assert not bad, f"{name}: relied-on symmetries broken: {bad}"
    assert not [c for c in r.checks if c.relied_on and c.verdict == "approximate"]
    # not vacuous: the structure of every model is witnessed by some exact relied-on check
    witnessed = {c.kind for c in r.checks if c.relied == "structure" and c.verdict == "exact"}
    assert witnessed & {"neuron_perm", "vo_rotation"}, (name, witnessed)
    # every trainable tensor is acted on by a measured check or listed unchecked with a reason
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    measured = {p for c in r.checks if c.verdict != "untested" for p in c.params}
    unchecked = {u["name"]: u["reason"] for u in r.unchecked}
    assert trainable == (measured & trainable) | set(unchecked), trainable - measured - set(unchecked)
    assert not set(unchecked) & measured and all(unchecked.values())
    assert all(u["role"] == "vector" for u in r.unchecked if u["role"] not in ("attention", "matrix"))
    if r.unchecked:
        assert f"unchecked trainable tensors ({len(r.unchecked)})" in r.table()
        assert "Unchecked trainable tensors" in r.to_markdown()
    # the "no structure found" weights and MLA's projections are reported, with why
    if name in NO_STRUCTURE and name != "hand_tied_aux":  # aux: permuted with the vocabulary
        hits = [n for n in unchecked if re.search(NO_STRUCTURE[name], n)]
        assert hits and all("no structure found" in unchecked[n] or "low-rank" in unchecked[n] for n in hits)
    if name in MLA:
        hits = [n for n in unchecked if re.search(MLA[name], n)]
        assert len(hits) == 6 and all("no recorded AttentionBlock" in unchecked[n] for n in hits), hits


@pytest.mark.parametrize("name", SIGMOID + SOFTMAX_ROUTERS)
def test_router_shift_follows_the_entry_group(name):
    """A sigmoid router's block group has no shift and its map is uncentered: its
    router_shift is measured but informational; a softmax router's centered map relies on it."""
    r = report(name)
    shifts = r.by_kind("router_shift")
    assert shifts
    for c in shifts:
        if name in SIGMOID:
            assert not c.relied_on and c.relied == "" and c.verdict == "broken"
        else:
            assert c.relied == "projects out" and c.verdict == "exact"
    assert r.downgrade_rules() == {} and r.broken_factors() == {}


def test_gpt_neox_per_head_interleaved_qkv():
    """The traced head order: q_h, k_h, v_h are blocks 3h, 3h+1, 3h+2 of query_key_value;
    the v/o rotation acting there is exact and relied on (per-head polar maps)."""
    plan = plan_of("gpt_neox")
    attn = [b for b in plan.blocks if isinstance(b, AttentionBlock)]
    assert len(attn) == 2
    for b in attn:
        assert b.qkv is not None and b.heads()[:3] == ((0, 3, 6, 9), (1, 4, 7, 10), (2, 5, 8, 11))
    r = report("gpt_neox")
    vo = r.by_kind("vo_rotation")
    assert len(vo) == 2 and all(c.verdict == "exact" and c.relied == "structure" for c in vo), vo
    # ignoring the interleaving ([q | k | v] blocks) acts on the wrong rows: the check fails
    m, batch = model_and_batch("gpt_neox")
    wrong = plan_of("gpt_neox")
    wrong.blocks = [
        dataclasses.replace(b, head_blocks=()) if isinstance(b, AttentionBlock) else b for b in wrong.blocks
    ]
    bad = equiopt.audit(m, batch, plan=wrong, grads=False)
    vo = bad.by_kind("vo_rotation")
    assert all(c.verdict == "broken" and c.error > 1e-3 for c in vo)
    assert {c.kind for c in bad.relied_on_broken()} >= {"vo_rotation"}


def test_vision_and_encoder_inputs():
    for name in VISION:
        r = report(name)
        assert r.settings["input"] == "pixel_values"
        assert "vo_rotation" in {c.kind for c in r.checks}
        assert not r.by_kind("vocab_perm") and not r.by_kind("tied_perm")  # no token ids to relabel
        assert any("no logits" in n for n in r.settings["implementation"])
    r = report("bert")
    assert r.settings["input"] == "input_ids" and [c.verdict for c in r.by_kind("vocab_perm")] == ["exact"]
    assert any("fixed random" in n for n in r.settings["implementation"])
