"""Edge-level circuits: the graph, EAP / EAP-IG / RelP on edges, exact evaluation, known answers."""

import types

import pytest
import torch
from heads_handbuilt import handbuilt_induction_model

import mechkit as mk
from mechkit import circuits as C
from mechkit.hookpoints import get_module, has_mechkit_hooks


def test_edge_counts():
    assert C.Graph(12, 12, 12).n_edges == 32491  # GPT-2 small, as EAP-IG counts it
    # MIB's other three models, ungrouped as EAP-IG and MIB count them (EAP-IG's Graph.from_model gives the
    # same: checked with its code); mechkit's grouped graph has fewer, C.ungroup_kv gives these
    assert [C.Graph(24, 14, 14).n_edges, C.Graph(26, 8, 8).n_edges, C.Graph(32, 32, 32).n_edges] == [
        179749, 74218, 1592881]  # Qwen-2.5-0.5B, Gemma-2-2B, Llama-3.1-8B
    assert C.Graph(24, 14, 2).n_edges < 179749
    assert C.Graph(4, 8, 8).n_edges == 1519       # tiny-gpt2
    g = C.Graph(2, 4, 2)                          # GQA: one k and one v receiver per KV head
    assert g.n_receivers == 2 * (4 + 2 + 2 + 1) + 1
    assert g.n_edges == (1 * 8 + 5) + (6 * 8 + 10) + 11
    par = C.Graph(2, 4, 4, parallel=True)         # a parallel block's MLP does not read its own heads
    assert par.n_edges == C.Graph(2, 4, 4).n_edges - 2 * 4
    assert g.edge_name(*g.edge_index("a0.h3->a1.kv1<k>")) == "a0.h3->a1.kv1<k>"
    with pytest.raises(KeyError, match="no edge named"):
        g.edge_index("a1.h0->a0.h0<q>")
    with pytest.raises(KeyError, match=r"names look like 'input->a0\.kv0<k>', 'm1->logits'"):  # the example is this graph's
        g.edge_index("a0.h1->a1.h1<v>")  # a query head's number where GQA names the KV head


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


# --------------------------------------------------------------------------- exactness
class FrozenLayerNorm(torch.nn.Module):
    """LayerNorm with its scale frozen at a constant: centring and an affine map, linear in x."""

    def __init__(self, ln, scale: float):
        super().__init__()
        self.weight, self.bias, self.scale = ln.weight, ln.bias, scale

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / self.scale * self.weight + self.bias


def _random_double(cls, cfg):
    """``cls(cfg)`` in float64, eval mode, every parameter drawn from N(0, 0.3^2) (seeded by the caller)."""
    hf = cls(cfg).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf


def linearised_gpt2():
    """A random GPT-2 made affine in its input: LayerNorm scales frozen, identity MLP activation,
    attention patterns frozen (query and key weights zero: uniform causal attention)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_inner=48, vocab_size=50, n_positions=32,
                        activation_function="linear", bos_token_id=0, eos_token_id=0)
    hf = _random_double(tf.GPT2LMHeadModel, cfg)
    with torch.no_grad():
        for b in hf.transformer.h:
            b.attn.c_attn.weight[:, :2 * 32] = 0
            b.attn.c_attn.bias[:2 * 32] = 0
            b.ln_1, b.ln_2 = FrozenLayerNorm(b.ln_1, 0.7), FrozenLayerNorm(b.ln_2, 1.3)
        hf.transformer.ln_f = FrozenLayerNorm(hf.transformer.ln_f, 0.9)
    return hf


def linearised_gptj():
    """A random GPT-J (no hand-written map: detected; parallel attention and MLP reading one norm; rotary)
    made affine like :func:`linearised_gpt2`: frozen LayerNorm scales, identity MLP activation, zero query
    and key weights."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPTJConfig(n_layer=3, n_embd=32, n_head=4, rotary_dim=4, n_inner=48, vocab_size=50, n_positions=32,
                        activation_function="linear", bos_token_id=0, eos_token_id=0)
    hf = _random_double(tf.GPTJForCausalLM, cfg)
    with torch.no_grad():
        for b in hf.transformer.h:
            b.attn.q_proj.weight.zero_()
            b.attn.k_proj.weight.zero_()
            b.ln_1 = FrozenLayerNorm(b.ln_1, 0.7)
        hf.transformer.ln_f = FrozenLayerNorm(hf.transformer.ln_f, 0.9)
    return hf


def random_task(n, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ct, xt = torch.randint(1, vocab, (n, T), generator=g), torch.randint(1, vocab, (n, T), generator=g)
    mask = torch.ones_like(ct)
    mask[0, :2] = 0  # a left-padded row
    ans, wrong = torch.randint(1, vocab, (n,), generator=g), torch.randint(1, vocab, (n,), generator=g)
    return mk.tasks.PatchingTask(ct, xt, mask, mask.clone(), ans, wrong, [""] * n, [""] * n)


@pytest.mark.parametrize("grad_on,build", [("corrupted", "gpt2"), ("clean", "gpt2"), ("corrupted", "gptj")])
def test_eap_equals_exact_edge_patching_on_a_linearised_model(grad_on, build):
    m = mk.load(linearised_gpt2() if build == "gpt2" else linearised_gptj())  # gptj: a detected, parallel map
    assert C.Graph.from_model(m).parallel == (build == "gptj") == m.hook_map.source.startswith("auto-detected")
    task = random_task(4, 7, 50)
    exact = C.edge_patching_scores(m, task)
    eap = C.attribute(m, task, method="eap", grad_on=grad_on, progress=False)
    _, e = exact.edge_values()
    _, a = eap.edge_values()
    names = exact.edge_values()[0]
    qk = torch.tensor([n.endswith(("<q>", "<k>")) for n in names])
    assert e[qk].abs().max() < 1e-9  # frozen patterns: queries and keys carry nothing
    assert e.abs().max() > 0.1 and bool((e[~qk].abs() > 1e-4).all())  # every other edge matters
    torch.testing.assert_close(a.double(), e.double(), atol=1e-5, rtol=0)
    for method in ("eap-ig", "eap-ig-activations"):  # constant gradients: IG (inputs or activations) = EAP
        ig = C.attribute(m, task, method=method, ig_steps=3, progress=False)
        torch.testing.assert_close(ig.edge_values()[1].double(), e.double(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- evaluation vs a hand loop
def hand_evaluate(m, task, circuit, ablation="corrupted"):
    """The circuit patched by hand: plain hooks, Python loops over heads and senders, edges looked
    up by name. Every receiver reads, from each sender outside the circuit, the ablated value
    instead of the current one."""
    L, H, Hkv = m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_kv_heads
    kv = "kv" if Hkv != H else "h"
    names = set(circuit.edge_names)

    def sender_hooks(store):
        return _hand_sender_hooks(m, store, through_post_norm=True)

    def upstream(l, mlp=False):
        out = ["input"] + [f"a{i}.h{h}" if h < H else f"m{i}" for i in range(l) for h in range(H + 1)]
        return out + ([f"a{l}.h{h}" for h in range(H)] if mlp else [])

    def clean_b():
        return m.batch(task.clean_tokens, attention_mask=task.clean_mask)

    abl = {}
    if ablation == "corrupted":
        with m.hooks(sender_hooks(abl)):
            m.hf_model(**m.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask).kwargs(), use_cache=False)
    else:
        with m.hooks(sender_hooks(abl)):
            m.hf_model(**clean_b().kwargs(), use_cache=False)
        w = task.clean_mask.double()[:, :, None]
        abl = {k: ((v.double() * w).sum((0, 1)) / w.sum()).to(v.dtype) for k, v in abl.items()}
    cur = {}

    def patch(recv_of, l, mlp=False):
        def fn(x, hook):
            x = x.clone()
            for i in range(x.shape[2] if x.dim() == 4 else 1):
                for u in upstream(l, mlp):
                    if f"{u}->{recv_of(i)}" not in names:
                        if x.dim() == 4:
                            x[:, :, i] += abl[u] - cur[u]
                        else:
                            x += abl[u] - cur[u]
            return x
        return fn

    hooks = sender_hooks(cur) + _receiver_hooks(L, kv, patch, mlp_reads_heads=not circuit.graph.parallel)
    with torch.no_grad(), m.hooks(hooks):
        logits = m.hf_model(**clean_b().kwargs(), use_cache=False).logits
    return float(mk.patching.metrics.logit_diff(task)(logits).mean())


def _hand_sender_hooks(m, store: dict, through_post_norm: bool) -> list:
    """The hand loops' hooks recording every sender's output into ``store`` by name: the input, each
    head's ``z_h W_O[h]`` (through the post-norm at the whole output's scale, or before it), each MLP."""
    L, H, dh = m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_head

    def head_out(l):
        def fn(z, hook):
            W = mk.weights.weight_in_out(m.family_module("attn_out_proj", l))
            res = [z[:, :, h] @ W[h * dh:(h + 1) * dh] for h in range(H)]
            for h, r in enumerate(_post_norm_by_hand(m, l, res) if through_post_norm else res):
                store[f"a{l}.h{h}"] = r
        return fn
    hs = [("blocks.0.hook_resid_pre", lambda x, hook: store.__setitem__("input", x.clone()))]
    for l in range(L):
        hs.append((f"blocks.{l}.attn.hook_z", head_out(l)))
        hs.append((f"blocks.{l}.hook_mlp_out", lambda x, hook, l=l: store.__setitem__(f"m{l}", x.clone())))
    return hs


def _receiver_hooks(L: int, kv: str, patch, mlp_reads_heads: bool) -> list:
    """The hand loops' hooks on every receiver's input: ``patch(receiver name of index i, layer, mlp)``."""
    hooks = []
    for l in range(L):
        hooks.append((f"blocks.{l}.hook_q_input", patch(lambda i, l=l: f"a{l}.h{i}<q>", l)))
        hooks.append((f"blocks.{l}.hook_k_input", patch(lambda i, l=l: f"a{l}.{kv}{i}<k>", l)))
        hooks.append((f"blocks.{l}.hook_v_input", patch(lambda i, l=l: f"a{l}.{kv}{i}<v>", l)))
        hooks.append((f"blocks.{l}.hook_mlp_in", patch(lambda i, l=l: f"m{l}", l, mlp=mlp_reads_heads)))
    return hooks + [(f"blocks.{L - 1}.hook_resid_post", patch(lambda i: "logits", L))]


def _post_norm_by_hand(m, l, res):
    """Heads' outputs [b, p, d] each; through an RMS post-norm (Gemma 2/3, GLM-4) scaled by their sum's
    root mean square (the output bias included), where the map has one."""
    fam = m.hook_map.family
    if "attn_post_norm" not in fam:
        return res
    assert fam["norm_kind"] == "rmsnorm"
    norm = m.family_module("attn_post_norm", l)
    b = mk.weights.bias_of(m.family_module("attn_out_proj", l))
    total = sum(res) + (0 if b is None else b)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    scale = (total.float().pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    w = norm.weight.float() + float(fam.get("norm_weight_offset", 0.0))
    return [(r.float() * scale * w).to(r.dtype) for r in res]


def assert_single_edges_equal_the_hand_loop(m, task, g, edges, effects):
    """Each edge's effect equals the full circuit's metric minus the hand-patched circuit without it."""
    full = hand_evaluate(m, task, C.Circuit.full(g))
    for e, v in zip(edges, effects.tolist()):
        keep = g.real.clone()
        keep[g.edge_index(e)] = False
        assert abs(v - (full - hand_evaluate(m, task, C.Circuit(g, keep)))) < 1e-5, e


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_fused_evaluation_equals_the_hand_loop(name):
    m = mk.load(name)
    task = mk.tasks.ioi(m.tokenizer, n=4, seed=1)
    assert (task.clean_mask == 0).any()  # padded prompts
    g = C.Graph.from_model(m)
    gen = torch.Generator().manual_seed(0)
    # a small circuit (most heads read the same fully ablated input), a middling and a large one
    circuits = [C.Circuit(g, torch.rand(g.real.shape, generator=gen) < p) for p in (0.02, 0.3, 0.9)]
    one_off = g.real.clone()
    one_off[g.edge_index("a0.h1->a3.h5<v>" if name == "tiny-gpt2" else "input->a0.kv1<v>")] = False
    circuits.append(C.Circuit(g, one_off))
    fused = C.evaluate(m, task, circuits, max_bytes=2**20)  # several chunks
    loop = torch.tensor([hand_evaluate(m, task, c) for c in circuits])
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    assert len(set(fused.tolist())) == len(circuits)  # the circuits differ in effect
    # single-edge patching (gather path, started at the receiver's layer) equals the loop too
    edges = ["input->a0.h0<q>", "m2->logits", "a1.h2->m1", circuits[-1].graph.edge_name(*(~one_off & g.real).nonzero()[0])]
    names, eff = C.edge_patching(m, task, edges, max_tokens=1)  # one circuit per chunk: each starts at its layer
    _, eff_fused = C.edge_patching(m, task, edges)  # all four in one chunk: row groups of one batch
    torch.testing.assert_close(eff_fused, eff, atol=1e-5, rtol=1e-5)
    assert_single_edges_equal_the_hand_loop(m, task, g, edges, eff)
    mean = C.evaluate(m, task, circuits[1], ablation="mean")
    assert abs(mean - hand_evaluate(m, task, circuits[1], ablation="mean")) < 1e-5


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_evaluation_runs_only_positions_after_the_shared_prefix(name):
    """IOI's clean and corrupted prompts agree up to the subject's second mention: there every circuit's
    run is the clean run, so exact evaluation runs only the later positions (the first ones' keys and
    values from the clean run). Circuits and single edges equal the hand loop and the run that computes
    every position (a user's hook on the model turns the shortcut off)."""
    m = mk.load(name)
    task = mk.tasks.ioi(m.tokenizer, n=3, seed=4)
    differ = (task.clean_tokens != task.corrupt_tokens) | (task.clean_mask != task.corrupt_mask)
    p0, T = int(differ.float().argmax(1).min()), task.clean_tokens.shape[1]
    assert 0 < p0 < T - 1
    g = C.Graph.from_model(m)
    gen = torch.Generator().manual_seed(1)
    circuits = [C.Circuit(g, torch.rand(g.real.shape, generator=gen) < p) for p in (0.05, 0.5)]
    edges = ["m2->logits", "input->a0.h1<q>", "a1.h3->m2"]
    seen = []  # positions of each forward through the last layer: every call's clean and corrupted runs, then its chunks

    def count(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(count, with_kwargs=True)
    try:
        short = C.evaluate(m, task, circuits)
        _, short_edges = C.edge_patching(m, task, edges)
        assert seen.count(T) == 4 and set(seen) == {T, T - p0}, seen
        seen.clear()
        with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):
            whole = C.evaluate(m, task, circuits)
            _, whole_edges = C.edge_patching(m, task, edges)
        assert set(seen) == {T}
        mean = C.evaluate(m, task, circuits[0], ablation="mean")  # means differ at every position: all run
        assert seen[-1] == T
    finally:
        handle.remove()
    torch.testing.assert_close(short, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short_edges, whole_edges, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, torch.tensor([hand_evaluate(m, task, c) for c in circuits]), atol=1e-5, rtol=1e-5)
    assert_single_edges_equal_the_hand_loop(m, task, g, edges, short_edges)
    assert abs(mean - hand_evaluate(m, task, circuits[0], ablation="mean")) < 1e-5
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_shared_prefix_on_a_sliding_window_longer_than_the_prompts(family):
    """Sliding-window models (Gemma 2 with its post-norms, Mistral) whose window the prompts do not reach
    take the shortcut too: evaluation, single edges and attribution run only the later positions and equal
    the hand loops and the runs over every position."""
    from factories import random_hf_model
    from test_patching import make_task

    from mechkit.model import HookedModel
    from mechkit.tasks.base import PatchingTask

    t = make_task(211, lengths=[7, 5, 6])
    T, p0 = t.clean_tokens.shape[1], 4
    corrupt = t.corrupt_tokens.clone()
    corrupt[:, :p0] = t.clean_tokens[:, :p0]
    task = PatchingTask(t.clean_tokens, corrupt, t.clean_mask, t.corrupt_mask, t.answer_ids, t.wrong_ids, [], [])
    m = HookedModel(random_hf_model(family, sliding_window=T + 1))
    g = C.Graph.from_model(m)
    gen = torch.Generator().manual_seed(1)
    circuits = [C.Circuit(g, torch.rand(g.real.shape, generator=gen) < p) for p in (0.05, 0.5)]
    edges = ["input->a0.h0<q>", "a0.h3->m1", "m1->logits", "a0.h1->a2.kv1<v>"]
    seen = []
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        short, (_, short_edges), short_eap = (C.evaluate(m, task, circuits), C.edge_patching(m, task, edges),
                                              C.attribute(m, task, "eap", progress=False))
        assert T - p0 in seen
        seen.clear()
        with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):
            whole, (_, whole_edges), whole_eap = (C.evaluate(m, task, circuits), C.edge_patching(m, task, edges),
                                                  C.attribute(m, task, "eap", progress=False))
        assert set(seen) == {T}
    finally:
        handle.remove()
    torch.testing.assert_close(short, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, torch.tensor([hand_evaluate(m, task, c) for c in circuits]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short_edges, whole_edges, atol=1e-5, rtol=1e-5)
    assert_single_edges_equal_the_hand_loop(m, task, g, edges, short_edges)
    torch.testing.assert_close(short_eap.values, whole_eap.values, atol=1e-5 * float(whole_eap.values.abs().max()), rtol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_attribution_runs_only_positions_after_the_shared_prefix(name):
    """Edge attribution on IOI: before the subject's second mention the clean and corrupted runs (and
    every interpolation between them) are the same run and every sender difference is 0, so after the
    first forward only the later positions run. Scores equal those of the runs that compute every
    position (a user's hook on the model turns the shortcut off), per position too (0 before p0)."""
    m = mk.load(name)
    task = mk.tasks.ioi(m.tokenizer, n=3, seed=4)
    T = task.clean_tokens.shape[1]
    p0 = int(((task.clean_tokens != task.corrupt_tokens) | (task.clean_mask != task.corrupt_mask)).any(0).float().argmax())
    seen = []

    def count(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(count, with_kwargs=True)
    runs = [("eap", {}), ("eap", {"grad_on": "clean", "per_position": True}), ("eap-ig", {"ig_steps": 3}),
            ("eap-ig-activations", {"ig_steps": 2}), ("eap-ig-activations", {"ig_steps": 2, "ig_scope": "all"}),
            ("relp", {})]
    try:
        for method, kw in runs:
            seen.clear()
            short = C.attribute(m, task, method, progress=False, **kw)
            assert seen.count(T) == 1 and set(seen) == {T, T - p0}, (method, seen)
            with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):
                whole = C.attribute(m, task, method, progress=False, **kw)
            scale = float(whole.values.abs().max())
            torch.testing.assert_close(short.values, whole.values, atol=1e-5 * scale, rtol=0, msg=method)
            if short.per_position:
                assert float(short.values[:p0].abs().max()) == 0.0
    finally:
        handle.remove()
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_single_edge_rows_join_at_their_receivers_layer(name):
    """Single-edge patching runs each edge's rows only from its receiver's layer on (below it they equal
    the clean run): a decoder layer sees the rows of the edges that end at or below it, and the result
    equals one chunk per edge (each started at its own layer) and the hand loop."""
    m = mk.load(name)
    task = mk.tasks.ioi(m.tokenizer, n=3, seed=2)
    g = C.Graph.from_model(m)
    kv = "h1" if name == "tiny-gpt2" else "kv1"
    edges = ["m2->logits", f"input->a0.{kv}<k>", "a0.h2->a2.h0<q>", "a1.h1->m1", "input->m0"]
    layers = [get_module(m.hf_model, m.hook_map.family["layers"])[l] for l in range(g.n_layers)]
    seen = {}

    def count(l):
        def pre(module, args, kwargs):
            seen[l] = (args[0] if args else kwargs["hidden_states"]).shape[0]
        return pre
    handles = [mod.register_forward_pre_hook(count(l), with_kwargs=True) for l, mod in enumerate(layers)]
    try:
        _, fused = C.edge_patching(m, task, edges)
        n = task.clean_tokens.shape[0]
        ends = [0, 0, 1, 2, g.n_layers - 1, g.n_layers - 1]  # the receivers' layers and the full circuit's (the last)
        assert seen == {l: n * sum(e <= l for e in ends) for l in range(g.n_layers)}
        with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):  # a user's hook may index rows: no joins
            _, held = C.edge_patching(m, task, edges)
        assert set(seen.values()) == {n * len(ends)}
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(held, fused, atol=1e-5, rtol=1e-5)
    _, apart = C.edge_patching(m, task, edges, max_tokens=1)
    torch.testing.assert_close(fused, apart, atol=1e-5, rtol=1e-5)
    assert_single_edges_equal_the_hand_loop(m, task, g, edges, fused)
    assert not has_mechkit_hooks(m.hf_model)
    assert not has_mechkit_hooks(m.hf_model)


# --------------------------------------------------------------------------- circuits and files
def test_circuit_extraction_pruning_json_and_scores_files(tmp_path):
    g = C.Graph(2, 4, 2)  # grouped-query: written ungrouped for EAP-IG
    gen = torch.Generator().manual_seed(0)
    scores = C.EdgeScores(torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.real, g, {}, {"method": "x"})
    top = scores.circuit(10, prune=False)
    assert top.n_edges == 10 and set(top.edge_names) == {n for n, _ in scores.top(10)}
    assert repr(top) == f"Circuit(10 of {g.n_edges} edges, {len(top.nodes)} nodes, {g})"  # short: no tensors
    pruned = scores.circuit(10)
    # MIB's rule: every kept sender reaches a kept receiver and (but the input) is reached
    own = g.receiver_owner.float()
    has_in = (pruned.edges.any(0).float() @ own) > 0
    for s in pruned.edges.any(1).nonzero()[:, 0].tolist():
        assert s == 0 or has_in[s]
    assert set(pruned.edge_names) <= set(top.edge_names)
    greedy = scores.circuit(10, mode="greedy", prune=False)
    assert greedy.n_edges == 10 and greedy.edges[:, g.logits].any()  # grown from the logits
    # a dangling chain is removed: a0.h0 -> m0 alone (m0 reaches nothing) prunes to nothing
    assert C.Circuit.from_edges(g, ["input->a0.h0<q>", "a0.h0->m0"]).pruned().n_edges == 0
    assert C.Circuit.from_edges(g, ["input->a0.h0<q>", "a0.h0->logits"]).pruned().n_edges == 2
    d = pruned.to_json(tmp_path / "c.json")
    assert "input->a1.h1<k>" in d["edges"] and "input->a1.h2<k>" in d["edges"]  # ungrouped names
    back = C.Circuit.from_json(g, tmp_path / "c.json")
    assert torch.equal(back.edges, pruned.edges)
    with pytest.raises(ValueError, match="does not exist"):
        C.Circuit.from_json(g, {"cfg": {"n_layers": 2, "n_heads": 4}, "nodes": {}, "edges": {"a1.h0->a0.h0<q>": {}}})
    scores.save(tmp_path / "s.safetensors")
    again = C.EdgeScores.load(tmp_path / "s.safetensors")
    assert torch.equal(again.values, scores.values) and again.graph == g
    (tmp_path / "bad.safetensors.json").write_text('{"kind": "result"}')
    with pytest.raises(ValueError, match="not an edge-scores header|kind"):
        C.EdgeScores.load(tmp_path / "bad.safetensors")


def test_attribute_batches_bad_input_and_no_hooks_left():
    m = mk.load("tiny-llama")
    task = mk.tasks.ioi(m.tokenizer, n=6, seed=2)
    full = C.attribute(m, task, method="relp", progress=False)
    split = C.attribute(m, task, method="relp", batch_size=4, progress=False)
    torch.testing.assert_close(split.values, full.values, atol=1e-4, rtol=1e-4)
    pos = C.attribute(m, task, method="eap", per_position=True, progress=False)
    torch.testing.assert_close(pos.matrix, C.attribute(m, task, method="eap", progress=False).matrix,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown method"):
        C.attribute(m, task, method="acdc")
    with pytest.raises(ValueError, match="ablation must be"):
        C.evaluate(m, task, C.Circuit.full(C.Graph.from_model(m)), ablation="zero")
    # the sender buffer is not zero-filled: a forward that skipped some senders' hooks is refused
    from mechkit.circuits.flow import SenderHooks

    sh = SenderHooks(m, C.Graph.from_model(m))
    with torch.no_grad(), m.hooks(sh.hooks()[1:]):  # the input's hook left out
        m(task.clean_tokens)
    with pytest.raises(RuntimeError, match=r"\['input'\] \(1 of .*not recorded"):
        sh.complete()
    assert not has_mechkit_hooks(m.hf_model)


def test_faithfulness_curve_and_cli(tmp_path):
    m = mk.load("tiny-gpt2")
    task = mk.tasks.ioi(m.tokenizer, n=8, seed=3)
    s = C.attribute(m, task, method="eap-ig", progress=False)
    curve = C.faithfulness_curve(m, task, s, fractions=(0.01, 0.1, 0.5))
    sep = [C.evaluate(m, task, s.circuit(max(1, round(f * s.graph.n_edges)))) for f in curve.fractions]
    torch.testing.assert_close(torch.tensor(curve.metric), torch.tensor(sep), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        clean = float(mk.patching.metrics.logit_diff(task)(m(m.batch(task.clean_tokens, task.clean_mask))).mean())
    assert curve.full == pytest.approx(clean, abs=1e-4)
    assert curve.smallest(0.8) is not None and curve.smallest(0.8)[0] <= 0.1  # recovered with <= 10% of edges
    from mechkit.cli import main

    assert main(["circuit", "--model", "tiny-gpt2", "--n", "4", "--methods", "eap", "--out", str(tmp_path),
                 "--quiet"]) == 0
    d = __import__("json").loads((tmp_path / "circuit.json").read_text())
    assert set(d) == {"cfg", "nodes", "edges"} and len(d["edges"]) == 1519
    html = (tmp_path / "dashboard.html").read_text()
    assert "faithfulness curves" in html and "circuit (eap" in html
    mib = __import__("json").loads((tmp_path / "summary.json").read_text())["mib"]["eap"]
    assert mib["signed"][-1] == pytest.approx(1.0, abs=1e-4) and mib["absolute"][-1] == pytest.approx(1.0, abs=1e-4)
    assert mib["cmd"] >= 0 and mib["cpr"] == pytest.approx(  # the trapezoids of the curves it reports
        sum((b - a) * (x + y) / 2 for a, b, x, y in zip(C.MIB_FRACTIONS, C.MIB_FRACTIONS[1:], mib["signed"],
                                                          mib["signed"][1:])), abs=1e-9)


def test_tiny_llama_induction_circuit_within_ten_percent_of_edges():
    """Issue 15's faithfulness answer on the one (model, task) where 5 IG steps fall short: tiny-llama's
    induction circuit is recovered (f >= 0.8) with 10% of its edges by EAP-IG with 20 steps (5 steps
    reach 0.69 there: its induction attention is near-saturated, and the integral needs more points)."""
    m = mk.load("tiny-llama")
    task = mk.tasks.induction_task(m.tokenizer, n=12, T=8, seed=3)
    s = C.attribute(m, task, method="eap-ig", ig_steps=20, progress=False)
    curve = C.faithfulness_curve(m, task, s, fractions=(0.05, 0.07, 0.1))
    assert curve.smallest(0.8) is not None and curve.smallest(0.8)[0] <= 0.1, curve.faithfulness
    assert not has_mechkit_hooks(m.hf_model)


# IOI routes of the bundled models at the edge level (model cards, "How it solves IOI"): the previous-token
# head's values into the duplicate-suppression head and that head's output, directly (tiny-gpt2) or through
# the MLPs between them (tiny-llama: L0H3 -> MLP2 -> L3H3's values, L3H3 -> MLP3 -> logits; the direct
# L0H3 -> L3H3 edges rank 22 and 176 under exact patching).
IOI_ROUTES = {
    "tiny-gpt2": ["input->a0.h1<v>", "a0.h1->a3.h5<v>", "a3.h5->logits", "a3.h5->m3", "m3->logits"],
    "tiny-llama": ["input->a0.kv1<v>", "a0.h3->m2", "m2->a3.kv1<v>", "a3.h3->m3", "m3->logits"],
}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_bundled_ioi_routes_rank_in_the_top_ten(name):
    """Issue 15's known answer on the bundled models: each route edge is in the top 10 of exact single-edge
    patching over all edges (the route is what these weights do) and of EAP-IG and RelP."""
    m = mk.load(name)
    task = mk.tasks.ioi(m.tokenizer, n=12, seed=3)
    ranks = {"exact": C.edge_patching_scores(m, task)}
    for method in ("eap-ig", "relp"):
        ranks[method] = C.attribute(m, task, method=method, progress=False)
    got = {method: {e: s.rank(e) for e in IOI_ROUTES[name]} for method, s in ranks.items()}
    assert all(r <= 10 for by in got.values() for r in by.values()), got
    assert not has_mechkit_hooks(m.hf_model)


def test_unsupported_families_say_why():
    from arch_zoo import build
    from factories import random_hf_model

    m = mk.load(build("granite", residual_multiplier=0.22))  # a residual multiplier scales every term
    task = random_task(2, 5, 200)
    with pytest.raises(ValueError, match="scaled module outputs"):
        C.attribute(m, task, progress=False)
    assert not has_mechkit_hooks(m.hf_model)
    par = mk.load(random_hf_model("gpt_neox"))  # parallel residual: the MLP does not read its own layer's heads
    g = C.Graph.from_model(par)
    assert g.parallel and g.n_edges == C.Graph(3, 4, 4, parallel=True).n_edges
    s = C.attribute(par, random_task(2, 5, 200), method="eap", progress=False)
    assert s.matrix.abs().sum() > 0 and not has_mechkit_hooks(par.hf_model)


# detected: GQA; a parallel block; a per-token MLP; own attention code: one KV head, a shared norm (Falcon), ALiBi (MPT)
@pytest.mark.parametrize("model_type", ["olmo", "gptj", "opt", "falcon", "mpt"])
def test_detected_maps_get_edges_equal_to_the_hand_loop(model_type):
    """Detection finds the split q/k/v inputs (one norm read by linear q/k/v projections) and the MLP's
    input norm, so edge circuits run on architectures without a hand-written map: the fused evaluation
    equals the hand-written loop, and EAP, EAP-IG and RelP score every edge."""
    from arch_zoo import build

    from mechkit.tasks.base import PatchingTask

    m = mk.load(build(model_type))
    g = C.flow.check_model(m)
    assert g.parallel == m.cfg.parallel_attn_mlp == (model_type in ("gptj", "falcon"))
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(1, 200, (3, 7), generator=gen) for _ in range(2))
    ones = torch.ones_like(clean)
    task = PatchingTask(clean, corrupt, ones, ones, clean[:, 0], corrupt[:, 0], ["c"] * 3, ["x"] * 3)
    circuits = [C.Circuit(g, torch.rand(g.real.shape, generator=gen) < p) for p in (0.05, 0.5)]
    fused = C.evaluate(m, task, circuits)
    loop = torch.tensor([hand_evaluate(m, task, c) for c in circuits])
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    for method in ("eap", "eap-ig", "relp"):
        s = C.attribute(m, task, method=method, ig_steps=2, progress=False)
        assert bool(torch.isfinite(s.values).all()) and bool((s.values[g.real] != 0).any())
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("model_type", ["gptj", "phi", "falcon"])  # parallel blocks whose attention and MLP share one norm
def test_mlp_in_on_a_shared_norm_reaches_the_mlp_only(model_type):
    """Where one norm feeds both the attention and the MLP, ``hook_mlp_in`` is the MLP's own copy of
    the residual: a patch of it reaches the MLP (as norm(patched)) and not the attention, and exact
    patching of the edge input -> m0 equals a plain torch hook that gives the MLP module alone the
    corrupted run's input. (Hooking the shared norm's input instead moved the attention too.)"""
    from arch_zoo import build

    from mechkit.tasks.base import PatchingTask

    hf = build(model_type).eval()
    m = mk.load(hf)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(1, 200, (2, 6), generator=gen) for _ in range(2))
    push = torch.randn(m.cfg.d_model, generator=gen)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    _, base = m.run_with_cache(clean, names=names)
    seen = {}

    def bump(x, hook):
        seen["x"] = x.clone()
        return x + push
    _, got = m.run_with_cache(clean, names=names, hooks={"blocks.0.hook_mlp_in": bump})
    torch.testing.assert_close(seen["x"], base["blocks.0.hook_resid_pre"], atol=0, rtol=0)
    torch.testing.assert_close(got["blocks.0.hook_attn_out"], base["blocks.0.hook_attn_out"], atol=0, rtol=0)
    assert (got["blocks.0.hook_mlp_out"] - base["blocks.0.hook_mlp_out"]).abs().max() > 1e-3
    ones = torch.ones_like(clean)
    task = PatchingTask(clean, corrupt, ones, ones, clean[:, 0], corrupt[:, 0], ["c"] * 2, ["x"] * 2)
    metric = mk.patching.metrics.logit_diff(task, normalise=False)
    _, eff = C.faithfulness.edge_patching(m, task, ["input->m0"], "corrupted", metric, graph=C.flow.check_model(m))
    reader = _mlp_reader(hf, model_type)
    store = {}
    h = reader.register_forward_pre_hook(lambda mod, args: store.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        hf(corrupt)
    h.remove()
    with torch.no_grad():
        full = hf(clean).logits[:, -1].float()
        h = reader.register_forward_pre_hook(lambda mod, args: (store["x"], *args[1:]))
        try:
            cut = hf(clean).logits[:, -1].float()
        finally:
            h.remove()

    def diff(x):
        return float((x.gather(1, clean[:, :1]) - x.gather(1, corrupt[:, :1])).mean())
    assert abs(float(eff[0]) - (diff(full) - diff(cut))) <= 1e-5 * (1 + abs(diff(full)))
    assert not has_mechkit_hooks(hf)


def _mlp_reader(hf, model_type):
    """Layer 0's MLP module of the HF model (read from the model code, not from mechkit's map)."""
    return {"gptj": lambda: hf.transformer.h[0].mlp, "phi": lambda: hf.model.layers[0].mlp,
            "falcon": lambda: hf.transformer.h[0].mlp}[model_type]()


@pytest.mark.parametrize("model_type", ["gemma2", "glm4"])  # Gemma's shipped map; GLM-4 detected
def test_post_norm_models_get_edges_equal_to_the_hand_loop(model_type):
    """Where a norm follows the attention before the residual add, a head's output is its ``z W_O``
    through that norm with the scale frozen at the whole output of the same forward (the heads add up
    to ``hook_attn_out``): fused evaluation equals the hand loop (which normalises by hand), the full
    circuit is the clean run and the empty one the corrupted run, and EAP / EAP-IG / RelP score every edge."""
    from arch_zoo import build

    from mechkit.tasks.base import PatchingTask

    m = mk.load(build(model_type))
    assert "attn_post_norm" in m.hook_map.family
    g = C.flow.check_model(m)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(1, 200, (3, 7), generator=gen) for _ in range(2))
    ones = torch.ones_like(clean)
    task = PatchingTask(clean, corrupt, ones, ones, clean[:, 0], corrupt[:, 0], ["c"] * 3, ["x"] * 3)
    circuits = [C.Circuit(g, torch.rand(g.real.shape, generator=gen) < p) for p in (0.05, 0.5)]
    circuits += [C.Circuit.full(g), C.Circuit(g, torch.zeros_like(g.real))]
    fused = C.evaluate(m, task, circuits)
    loop = torch.tensor([hand_evaluate(m, task, c) for c in circuits])
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    metric = mk.patching.metrics.logit_diff(task)
    with torch.no_grad():
        ends = [float(metric(m(t)).mean()) for t in (clean, corrupt)]
    torch.testing.assert_close(fused[2:], torch.tensor(ends), atol=1e-5, rtol=1e-5)
    for method in ("eap", "eap-ig", "relp"):
        s = C.attribute(m, task, method=method, ig_steps=2, progress=False)
        assert bool(torch.isfinite(s.values).all()) and bool((s.values[g.real] != 0).any())
    assert not has_mechkit_hooks(m.hf_model)


def test_cli_as_eap_ig_uses_eap_igs_graph_and_readings(tmp_path, capsys):
    """``mechkit circuit --as-eap-ig`` on a grouped-query model: the graph is EAP-IG's ungrouped one (a
    key/value receiver per query head), EAP-IG on activations scores every edge in every run, EAP takes
    the clean run's gradient, and MIB's CPR/CMD are printed."""
    from mechkit.cli import main

    m = mk.load("tiny-llama")
    assert m.cfg.n_kv_heads < m.cfg.n_heads
    assert main(["circuit", "--model", "tiny-llama", "--n", "4", "--methods", "eap", "--as-eap-ig", "--out",
                 str(tmp_path), "--quiet"]) == 0
    s = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert s["n_edges"] == C.Graph(m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_heads).n_edges > C.Graph.from_model(m).n_edges
    assert s["options"]["ig_scope"] == "all" and s["options"]["grad_on"] == "clean"
    assert "MIB CPR" in capsys.readouterr().out


def _norm_by_hand(m, l, total):
    """Layer ``l``'s RMS post-norm of ``total`` [b, p, d] (the output bias added first), by hand."""
    norm = m.family_module("attn_post_norm", l)
    b = mk.weights.bias_of(m.family_module("attn_out_proj", l))
    x = (total + (0 if b is None else b)).float()
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    w = norm.weight.float() + float(m.hook_map.family.get("norm_weight_offset", 0.0))
    return (x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * w).to(total.dtype)


def hand_evaluate_pre_norm(m, task, circuit):
    """EAP-IG's reading of post-norms, by hand: senders are the heads before the norm; a receiver reads,
    besides the linear shifts of the input and the MLPs outside the circuit, each upstream layer's
    attention output recomputed by hand from its heads (ablated where the edge is outside the circuit)
    instead of the current output."""
    L, H = m.cfg.n_layers, m.cfg.n_heads
    kv = "kv" if m.cfg.n_kv_heads != H else "h"
    names = set(circuit.edge_names)

    def sender_hooks(store):
        return _hand_sender_hooks(m, store, through_post_norm=False)

    abl, cur = {}, {}
    with torch.no_grad(), m.hooks(sender_hooks(abl)):
        m.hf_model(**m.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask).kwargs(), use_cache=False)

    def shift(recv, l, mlp):
        heads_up = range(l + 1) if mlp else range(l)
        out = 0
        for u in ["input"] + [f"m{i}" for i in range(l)]:  # the MLPs below (an MLP is not its own sender)
            if f"{u}->{recv}" not in names:
                out = out + abl[u] - cur[u]
        for i in heads_up:
            heads = [f"a{i}.h{h}" for h in range(H)]
            mixed = sum(abl[u] if f"{u}->{recv}" not in names else cur[u] for u in heads)
            out = out + _norm_by_hand(m, i, mixed) - _norm_by_hand(m, i, sum(cur[u] for u in heads))
        return out

    def patch(recv_of, l, mlp=False):
        def fn(x, hook):
            x = x.clone()
            for i in range(x.shape[2] if x.dim() == 4 else 1):
                if x.dim() == 4:
                    x[:, :, i] += shift(recv_of(i), l, mlp)
                else:
                    x += shift(recv_of(i), l, mlp)
            return x
        return fn

    hooks = sender_hooks(cur) + _receiver_hooks(L, kv, patch, mlp_reads_heads=True)
    with torch.no_grad(), m.hooks(hooks):
        logits = m.hf_model(**m.batch(task.clean_tokens, attention_mask=task.clean_mask).kwargs(), use_cache=False).logits
    return float(mk.patching.metrics.logit_diff(task)(logits).mean())


def test_post_norm_eap_ig_reading_equals_the_hand_loop():
    """``post_norm_heads="pre_norm"`` on a grouped-query Gemma 2 with left padding: fused evaluation of
    several circuits in one batch, and single-edge patching of edges into a query, a shared key, an MLP
    and the logits, equal a hand loop that recomputes each upstream attention output per receiver."""
    from arch_zoo import build

    from mechkit.tasks.base import PatchingTask

    m = mk.load(build("gemma2"))
    assert "attn_post_norm" in m.hook_map.family and m.cfg.n_kv_heads < m.cfg.n_heads
    g = C.flow.check_model(m)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(1, 200, (3, 7), generator=gen) for _ in range(2))
    mask = torch.ones_like(clean)
    mask[0, :2] = 0  # left padding
    task = PatchingTask(clean, corrupt, mask, mask.clone(), clean[:, -1], corrupt[:, -1], ["c"] * 3, ["x"] * 3)
    circuits = [C.Circuit(g, torch.rand(g.real.shape, generator=gen) < p) for p in (0.1, 0.6)]
    circuits += [C.Circuit.full(g), C.Circuit(g, torch.zeros_like(g.real))]
    fused = C.evaluate(m, task, circuits, post_norm_heads="pre_norm")
    loop = torch.tensor([hand_evaluate_pre_norm(m, task, c) for c in circuits])
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    frozen = C.evaluate(m, task, circuits[:2])
    assert (frozen - fused[:2]).abs().max() > 1e-4  # the two readings differ on partial circuits
    edges = ["a0.h1->a1.h0<q>", "a0.h2->a1.kv0<k>", "a0.h3->m1", "a1.h1->logits", "input->a1.kv1<v>"]
    _, single = C.edge_patching(m, task, edges, post_norm_heads="pre_norm")
    full = float(fused[2])
    by_hand = [full - hand_evaluate_pre_norm(m, task, C.Circuit(g, g.real & ~_one(g, e))) for e in edges]
    torch.testing.assert_close(single.double(), torch.tensor(by_hand, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert not has_mechkit_hooks(m.hf_model)


def _one(g, edge: str) -> torch.Tensor:
    out = torch.zeros_like(g.real)
    out[g.edge_index(edge)] = True
    return out
