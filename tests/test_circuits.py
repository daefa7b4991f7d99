"""Edge-level circuits: the graph, EAP / EAP-IG / RelP on edges, exact evaluation, known answers."""

import types

import pytest
import torch
from heads_handbuilt import handbuilt_induction_model

import mechkit as mk
from mechkit import circuits as C
from mechkit.hookpoints import has_mechkit_hooks


def test_edge_counts():
    assert C.Graph(12, 12, 12).n_edges == 32491  # GPT-2 small, as EAP-IG counts it
    assert C.Graph(4, 8, 8).n_edges == 1519       # tiny-gpt2
    g = C.Graph(2, 4, 2)                          # GQA: one k and one v receiver per KV head
    assert g.n_receivers == 2 * (4 + 2 + 2 + 1) + 1
    assert g.n_edges == (1 * 8 + 5) + (6 * 8 + 10) + 11
    par = C.Graph(2, 4, 4, parallel=True)         # a parallel block's MLP does not read its own heads
    assert par.n_edges == C.Graph(2, 4, 4).n_edges - 2 * 4
    assert g.edge_name(*g.edge_index("a0.h3->a1.kv1<k>")) == "a0.h3->a1.kv1<k>"
    with pytest.raises(KeyError, match="no edge named"):
        g.edge_index("a1.h0->a0.h0<q>")


HAND = ["a1.h0->logits", "input->a1.h0<v>", "input->a1.h0<q>", "a0.h0->a1.h0<k>", "input->a0.h0<v>"]


def test_handbuilt_induction_circuit_comes_first():
    """Derived by hand (tests/heads_handbuilt.py): clean [BOS] x x[:k] vs corrupted [BOS] y y[:k].
    L0H0's query and key read positions only, the same in both runs, so no edge into them carries
    the difference; its value reads the token (input -> a0.h0<v>). L1H0 matches its query (the
    current token: input -> a1.h0<q>) against keys holding the previous token, which only L0H0
    writes (a0.h0 -> a1.h0<k>), and copies its value (input -> a1.h0<v>) to the logits
    (a1.h0 -> logits). MLPs and the other heads are zero. Exact single-edge patching confirms these
    five edges and nothing else; EAP-IG and RelP rank exactly them first."""
    m = mk.load(handbuilt_induction_model(q_scale=1.5))
    task = mk.tasks.induction_task(types.SimpleNamespace(bos_token_id=0), n=8, T=8, seed=0, pool=range(1, 20))
    names, eff = C.edge_patching(m, task)
    exact = {n for n, e in zip(names, eff.tolist()) if abs(e) > 1e-3}
    assert exact == set(HAND)
    for method in ("eap-ig", "relp"):
        s = C.attribute(m, task, method=method, progress=False)
        assert {n for n, _ in s.top(5)} == set(HAND), (method, s.top(6))
    assert not has_mechkit_hooks(m.hf_model)
