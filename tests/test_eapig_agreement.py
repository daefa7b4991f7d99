"""Edge scores equal to EAP-IG's own code (github.com/hannamw/EAP-IG, on TransformerLens 3) on the
same weights: a seeded 2-layer GPT-2 and a 2-layer Llama with grouped-query attention, each with a
fixed task, written by scripts/make_eapig_fixtures.py in a separate environment (EAP-IG needs
TransformerLens's HookedTransformer, gone in version 4)."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from mechkit import circuits as C
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel
from mechkit.tasks.base import PatchingTask

FIXTURES = Path(__file__).parent / "fixtures" / "eapig"
FIX = FIXTURES / "gpt2"
# EAP-IG's method -> mechkit's call; EAP-IG's EAP takes the gradient on the clean run
OURS = {
    "EAP": lambda m, t: C.attribute(m, t, method="eap", grad_on="clean", progress=False),
    "EAP-IG-inputs": lambda m, t: C.attribute(m, t, method="eap-ig", ig_steps=5, progress=False),
    "EAP-IG-activations": lambda m, t: C.attribute(m, t, method="eap-ig-activations", ig_steps=5, ig_scope="all",
                                                   progress=False),
    "exact": lambda m, t: C.edge_patching_scores(m, t),
}


def _load(folder: Path):
    hf = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    t = load_file(str(folder / "task.safetensors"))
    mask = torch.ones_like(t["clean"])
    task = PatchingTask(t["clean"], t["corrupt"], mask, mask.clone(), t["answer"], t["wrong"], [], [])
    return HookedModel(hf, None), task, json.loads((folder / "scores.json").read_text())["scores"]


@pytest.fixture(scope="module")
def setup():
    return _load(FIX)


@pytest.fixture(scope="module")
def llama():
    return _load(FIXTURES / "llama")


@pytest.fixture(scope="module")
def gemma2():
    return _load(FIXTURES / "gemma2")


def _grouped(model, ref: dict) -> dict:
    """EAP-IG's ungrouped scores summed onto mechkit's receivers: a KV head's key (value) input is one
    receiver, the sum of the per-query-head copies EAP-IG ungroups it into (scores are linear in it)."""
    per = model.cfg.n_heads // model.cfg.n_kv_heads
    if per == 1:  # one KV head per query head: the receivers keep EAP-IG's names
        return dict(ref)
    out: dict = {}
    for name, v in ref.items():
        ours = re.sub(r"a(\d+)\.h(\d+)<([kv])>$", lambda m: f"a{m[1]}.kv{int(m[2]) // per}<{m[3]}>", name)
        out[ours] = out.get(ours, 0.0) + v
    return out


@pytest.mark.parametrize("method", list(OURS))
def test_edge_scores_equal_eap_igs_code(setup, method):
    """Every edge's score equals EAP-IG's, with EAP-IG's sign (corrupted minus clean) flipped: mechkit
    scores what the edge's clean value adds to the metric."""
    model, task, ref = setup
    names, ours = OURS[method](model, task).edge_values()
    assert set(names) == set(ref[method])  # the same graph: 110 edges, EAP-IG's names
    theirs = torch.tensor([ref[method][n] for n in names])
    assert theirs.abs().max() > 0.05  # the fixture holds real effects
    torch.testing.assert_close(ours.double(), -theirs.double(), atol=1e-6, rtol=0)
    assert not has_mechkit_hooks(model.hf_model)


def test_activations_scope_sender_differs_from_eap_igs_code(setup):
    """The default ``ig_scope="sender"`` (each edge from its own sender group's interpolation runs) is a
    different quantity from EAP-IG's code, which averages every group's runs into every edge."""
    model, task, ref = setup
    names, ours = C.attribute(model, task, method="eap-ig-activations", ig_steps=5, progress=False).edge_values()
    theirs = torch.tensor([ref["EAP-IG-activations"][n] for n in names])
    assert (ours.double() + theirs.double()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ig_scope"):
        C.attribute(model, task, method="eap-ig-activations", ig_scope="every", progress=False)


def test_circuits_equal_eap_igs_extraction_and_evaluation(setup):
    """Top-n circuits as EAP-IG extracts them (``apply_topn``, absolute, pruned of dangling nodes) from
    its EAP-IG scores are the ones :meth:`EdgeScores.circuit` extracts, and EAP-IG's ``evaluate_graph``
    (every edge outside the circuit patched from the corrupted run) gives the metric
    :func:`mechkit.circuits.evaluate` gives; also for the full model and the empty circuit."""
    model, task, _ = setup
    ref = json.loads((FIX / "scores.json").read_text())
    g = C.Graph.from_model(model)
    values = torch.zeros(g.n_senders, g.n_receivers)
    for name, v in ref["scores"]["EAP-IG-inputs"].items():
        values[g.edge_index(name)] = -v
    scores = C.EdgeScores(values, g)
    sizes = []
    for c in ref["circuits"]:
        circuit = C.Circuit.full(g) if c["n"] == "full" else C.Circuit.from_edges(g, c["edges"])
        assert abs(C.evaluate(model, task, circuit) - c["metric"]) < 1e-6, c["n"]
        if isinstance(c["n"], int) and c["n"] > 0:
            assert sorted(scores.circuit(c["n"]).edge_names) == c["edges"], c["n"]
            sizes.append((c["n"], len(c["edges"])))
    assert any(kept < n for n, kept in sizes), sizes  # pruning removed dangling edges in some


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_grouped_query_scores_equal_eap_igs_ungrouped_sums(llama, method):
    """Llama with 4 query and 2 KV heads (RMSNorm with random gains, rotary, gated MLP): mechkit's edge
    into a KV head's key or value equals the sum of EAP-IG's edges into the ungrouped per-head copies;
    every other edge equals EAP-IG's (sign flipped)."""
    model, task, ref = llama
    assert model.cfg.n_kv_heads < model.cfg.n_heads
    names, ours = OURS[method](model, task).edge_values()
    theirs = _grouped(model, ref[method])
    assert set(names) == set(theirs) and any(".kv" in n for n in names)
    torch.testing.assert_close(ours.double(), -torch.tensor([theirs[n] for n in names], dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_activations_differ_only_where_eap_igs_code_loses_gradients(name):
    """EAP-IG's code interpolates a node's output with a tensor that does not require grad; in a model
    without learned position embeddings the residual entering layer 0 then carries no gradient in
    the input's interpolation runs, TransformerLens's backward hooks at layer 0's q/k/v inputs never
    fire, and those runs add nothing to the edges input -> layer-0 q/k/v. mechkit keeps them. Every
    other edge equals EAP-IG's code; on those edges the difference is exactly the input runs' share,
    the sender-scope score divided by the number of node groups (2 L + 1). Gemma 2 with
    ``post_norm_heads="pre_norm"``: the heads are interpolated before the norm, as EAP-IG does."""
    model, task, ref = _load(FIXTURES / name)
    kw = {"post_norm_heads": "pre_norm"} if name == "gemma2" else {}
    names, ours = C.attribute(model, task, method="eap-ig-activations", ig_steps=5, ig_scope="all", progress=False,
                              **kw).edge_values()
    theirs = _grouped(model, ref["EAP-IG-activations"])
    gap = {n: float(v) + theirs[n] for n, v in zip(names, ours)}
    lost = {n for n in names if re.fullmatch(r"input->a0\.(h\d+|kv\d+)<[qkv]>", n)}
    assert max(abs(gap[n]) for n in names if n not in lost) < 1e-6
    s_names, sender = C.attribute(model, task, method="eap-ig-activations", ig_steps=5, progress=False,
                                  **kw).edge_values()
    share = dict(zip(s_names, sender.tolist()))
    groups = 2 * model.cfg.n_layers + 1
    assert max(abs(gap[n] - share[n] / groups) for n in lost) < 1e-6
    assert max(abs(gap[n]) for n in lost) > 1e-3  # the lost share is not negligible here


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_post_norm_heads_before_the_norm_equal_eap_igs_code(gemma2, method):
    """Gemma 2 (a norm on each sublayer's output before the residual add, soft-caps, random norm
    gains): with ``post_norm_heads="pre_norm"`` the heads' outputs before the norm are the senders, as
    in EAP-IG's code, and every edge equals EAP-IG's.
    mechkit's default (each head through the norm at the whole output's scale, what exact evaluation
    patches) is a different quantity here: it moves scores by more than the largest score."""
    model, task, ref = gemma2
    assert "attn_post_norm" in model.hook_map.family
    kw = {"grad_on": "clean"} if method == "EAP" else {"ig_steps": 5}
    how = {"EAP": "eap", "EAP-IG-inputs": "eap-ig"}[method]
    names, ours = C.attribute(model, task, method=how, post_norm_heads="pre_norm", progress=False, **kw).edge_values()
    theirs = _grouped(model, ref[method])
    want = -torch.tensor([theirs[n] for n in names], dtype=torch.float64)
    torch.testing.assert_close(ours.double(), want, atol=1e-6, rtol=0)
    _, frozen = C.attribute(model, task, method=how, progress=False, **kw).edge_values()
    assert (frozen.double() - want).abs().max() > want.abs().max() / 2
    with pytest.raises(ValueError, match="post_norm_heads"):
        C.attribute(model, task, method="eap", post_norm_heads="after", progress=False)
    assert not has_mechkit_hooks(model.hf_model)


def test_mib_cpr_and_cmd_equal_mibs_code(setup):
    """CPR and CMD as MIB's leaderboard computes them: MIB's own evaluate_area_under_curve (its EAP-IG
    submodule) on the same model and scores gives the same curves (faithfulness at each of MIB's ten
    sizes, signed and absolute), the same circuit sizes after pruning and the same two areas."""
    model, task, ref = setup
    mib = json.loads((FIX / "mib.json").read_text())
    g = C.Graph.from_model(model)
    values = torch.zeros(g.n_senders, g.n_receivers)
    for name, v in ref["EAP-IG-inputs"].items():
        values[g.edge_index(name)] = -v
    got = C.mib_scores(model, task, C.EdgeScores(values, g))
    for key in ("signed", "absolute"):
        assert got[key].n_edges == [int(c) for c in mib[key]["weighted_edge_counts"]], key
        torch.testing.assert_close(torch.tensor(got[key].faithfulness), torch.tensor(mib[key]["faithfulness"]),
                                   atol=1e-5, rtol=0)
    assert abs(got["cpr"] - mib["signed"]["area_under"]) < 1e-5
    assert abs(got["cmd"] - mib["absolute"]["area_from_1"]) < 1e-5
    curve = C.faithfulness_curve(model, task, C.EdgeScores(values, g))  # mechkit's own area is another number
    assert abs(curve.area - got["cpr"]) > 0.05


def test_post_norm_evaluation_equals_eap_igs_code(gemma2):
    """Gemma 2's post-norm as EAP-IG evaluates it (``post_norm_heads="pre_norm"``: each receiver reads the
    norm of its own mixture of clean and ablated heads): exact single-edge patching over every edge
    and circuits of 0, 6 and 50 edges (pruned top-n of EAP-IG's scores) and the full model give EAP-IG's
    ``evaluate_graph`` numbers; mechkit's default reading (heads through the norm at the whole output's
    scale) gives other numbers for the same edges."""
    model, task, ref = gemma2
    ref_all = json.loads((FIXTURES / "gemma2" / "scores.json").read_text())
    names, exact = C.edge_patching_scores(model, task, post_norm_heads="pre_norm").edge_values()
    theirs = -torch.tensor([ref["exact"][n] for n in names], dtype=torch.float64)
    torch.testing.assert_close(exact.double(), theirs, atol=1e-6, rtol=0)
    _, frozen = C.edge_patching_scores(model, task).edge_values()
    assert (frozen.double() - theirs).abs().max() > 1e-2
    g = C.Graph.from_model(model)
    circuits = [C.Circuit.full(g) if c["n"] == "full" else C.Circuit.from_edges(g, c["edges"]) for c in ref_all["circuits"]]
    got = C.evaluate(model, task, circuits, post_norm_heads="pre_norm")
    torch.testing.assert_close(got.double(), torch.tensor([c["metric"] for c in ref_all["circuits"]],
                                                          dtype=torch.float64), atol=1e-6, rtol=0)
    assert max(len(c["edges"] or []) for c in ref_all["circuits"]) == 50
    assert not has_mechkit_hooks(model.hf_model)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_circuit_files_move_between_mechkit_and_eap_ig(name, tmp_path):
    """A circuit file written by EAP-IG's ``Graph.to_json`` reads as the same circuit, and mechkit's file
    carries everything EAP-IG's ``Graph.from_json`` reads: its configuration keys and values (``d_model``
    included: EAP-IG builds its graph from them), every node and every edge by EAP-IG's names. A
    grouped-query model's file is ungrouped, as EAP-IG's is."""
    model, _, _ = _load(FIXTURES / name)
    theirs = json.loads((FIXTURES / name / "circuit_eapig.json").read_text())
    g = C.Graph.from_model(model)
    circuit = C.Circuit.from_json(g, theirs)
    kept = {n for n, e in theirs["edges"].items() if e["in_graph"]}
    assert circuit.n_edges > 0 and set(_grouped(model, dict.fromkeys(kept, 0.0))) == set(circuit.edge_names)
    ours = circuit.to_json(tmp_path / "c.json")
    assert {k: ours["cfg"].get(k) for k in theirs["cfg"]} == theirs["cfg"]
    assert set(ours["nodes"]) == set(theirs["nodes"]) and set(ours["edges"]) == set(theirs["edges"])
    if name == "gpt2":  # one receiver per head: the same membership edge by edge
        assert {n for n, e in ours["edges"].items() if e["in_graph"]} == kept
    assert json.loads((tmp_path / "c.json").read_text()) == ours


def test_ungrouped_gqa_model_equals_eap_igs_ungrouped_graph():
    """MIB's and EAP-IG's graph of a grouped-query model is ungrouped (a key/value receiver per query
    head). ``C.ungroup_kv`` makes the Hugging Face model compute the same with one KV head per query
    head (logits unchanged); on it mechkit's graph is EAP-IG's, edge for edge: EAP, EAP-IG, exact
    single-edge patching and circuit evaluation equal EAP-IG's code (1e-6), and MIB's circuit sizes
    count the same 110 edges."""
    hf = tf.AutoModelForCausalLM.from_pretrained(FIXTURES / "llama").eval()
    ids = torch.arange(8)[None]
    with torch.no_grad():
        before = hf(input_ids=ids).logits
        C.ungroup_kv(hf)
        assert hf.config.num_key_value_heads == hf.config.num_attention_heads
        assert torch.equal(hf(input_ids=ids).logits, before)
    model, task, ref = HookedModel(hf, None), *_load(FIXTURES / "llama")[1:]
    for method in ("EAP", "EAP-IG-inputs", "exact"):
        names, ours = OURS[method](model, task).edge_values()
        assert set(names) == set(ref[method])
        torch.testing.assert_close(ours.double(), -torch.tensor([ref[method][n] for n in names], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    g = C.Graph.from_model(model)
    assert g.n_edges == len(ref["EAP"]) == 110
    circuits = json.loads((FIXTURES / "llama" / "scores.json").read_text())["circuits"]
    got = C.evaluate(model, task, [C.Circuit.full(g) if c["n"] == "full" else C.Circuit.from_edges(g, c["edges"])
                                   for c in circuits])
    torch.testing.assert_close(got.double(), torch.tensor([c["metric"] for c in circuits], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_ungroup_kv_refuses_fused_projections():
    from factories import random_hf_model

    hf = random_hf_model("phi3")  # one fused qkv projection
    if hf.config.num_key_value_heads == hf.config.num_attention_heads:
        pytest.skip("the factory's Phi-3 has no grouped KV heads")
    with pytest.raises(ValueError, match="k_proj and v_proj"):
        C.ungroup_kv(hf)
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads


def test_scores_file_for_mib(setup, tmp_path):
    """EdgeScores.to_json writes every edge with its score and in the graph, with the configuration keys
    EAP-IG's (and MIB's) loader reads: what MIB takes as a scores submission."""
    model, _, ref = setup
    g = C.Graph.from_model(model)
    values = torch.zeros(g.n_senders, g.n_receivers)
    for name, v in ref["EAP-IG-inputs"].items():
        values[g.edge_index(name)] = -v
    d = C.EdgeScores(values, g).to_json(tmp_path / "scores.json")
    theirs = json.loads((FIX / "circuit_eapig.json").read_text())
    assert {k: d["cfg"].get(k) for k in theirs["cfg"]} == theirs["cfg"] and set(d["edges"]) == set(theirs["edges"])
    assert all(e["in_graph"] for e in d["edges"].values())
    assert all(abs(d["edges"][n]["score"] + v) < 1e-6 for n, v in ref["EAP-IG-inputs"].items())
    back = C.Circuit.from_json(g, tmp_path / "scores.json")
    assert back.n_edges == g.n_edges and torch.allclose(back.scores, values)


def test_ungroup_kv_on_a_hooked_model_and_a_stale_wrapper():
    """``C.ungroup_kv(hooked_model)`` returns a new HookedModel over the ungrouped model; the old
    wrapper, built for the grouped heads, refuses hooks with the reason instead of mis-slicing them."""
    old, task, _ = _load(FIXTURES / "llama")
    grouped_kv = old.cfg.n_kv_heads
    new = C.ungroup_kv(old)
    assert new is not old and new.cfg.n_kv_heads == new.cfg.n_heads > grouped_kv
    _, cache = new.run_with_cache(task.clean_tokens, names=["blocks.0.hook_k_input"])
    assert cache["blocks.0.hook_k_input"].shape[2] == new.cfg.n_heads
    with pytest.raises(ValueError, match="num_key_value_heads"):
        old.run_with_cache(task.clean_tokens, names=["blocks.0.hook_k_input"])
    assert not has_mechkit_hooks(new.hf_model)


def test_mib_scores_refuse_a_grouped_graph_unless_asked():
    """MIB counts a grouped-query model's edges ungrouped; on mechkit's grouped graph the circuit sizes
    would silently not be MIB's, so mib_scores says so and names the two ways on."""
    model, task, ref = _load(FIXTURES / "llama")
    names, _ = OURS["EAP"](model, task).edge_values()
    s = C.attribute(model, task, method="eap", progress=False)
    with pytest.raises(ValueError, match="ungroup_kv"):
        C.mib_scores(model, task, s)
    r = C.mib_scores(model, task, s, grouped=True)
    assert r["signed"].faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert len(names) < len(ref["EAP"])  # fewer edges than EAP-IG's ungrouped graph
