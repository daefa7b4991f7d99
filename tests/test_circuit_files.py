"""Circuit and edge-score files: EAP-IG's graph JSON (Circuit.from_json / to_json) and EdgeScores'
safetensors + JSON pair, read strictly (one sentence naming the file, what was expected and what came),
and the ``n`` arguments of circuit extraction."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import mechkit as mk
from mechkit import circuits as C

G = C.Graph(2, 4, 2, d_model=64)  # grouped-query: a KV receiver is shared by two query heads


def _scores(g=G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return C.EdgeScores(torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.real, g, {"clean": 1.5},
                        {"method": "x"})


def _refused(fn, *needles, exc=ValueError):
    """``fn`` raises ``exc`` with a one-line message containing every needle."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


@pytest.fixture
def circuit_file(tmp_path):
    """(path, dict) of a written 10-edge circuit of G."""
    c = _scores().circuit(10, prune=False)
    path = tmp_path / "c.json"
    return path, c.to_json(path)


def _write(tmp_path, d, name="x.json"):
    p = tmp_path / name
    p.write_text(d if isinstance(d, str) else json.dumps(d))
    return p


# --------------------------------------------------------------------------- Circuit.from_json
def test_from_json_refuses_string_booleans_and_bad_entries(tmp_path, circuit_file):
    _, d = circuit_file
    e = json.loads(json.dumps(d))
    for v in e["edges"].values():
        v["in_graph"] = "true" if v["in_graph"] else "false"
    p = _write(tmp_path, e)
    _refused(lambda: C.Circuit.from_json(G, p), str(p), "in_graph", "'false'")
    e = json.loads(json.dumps(d))
    first = next(iter(e["edges"]))
    e["edges"][first] = True
    _refused(lambda: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", first, "object")
    e = json.loads(json.dumps(d))
    e["edges"][first].pop("in_graph")
    _refused(lambda: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", first, "in_graph")


def test_from_json_checks_the_configuration_against_the_graph(tmp_path, circuit_file):
    _, d = circuit_file
    for key, value in [("d_model", 999), ("n_kv_heads", 4), ("parallel_attn_mlp", True), ("n_layers", 3)]:
        e = json.loads(json.dumps(d))
        e["cfg"][key] = value
        _refused(lambda e=e: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", f"{key}={value}")
    for key, value in [("n_layers", 4.9), ("parallel_attn_mlp", "false"), ("d_model", "64"), ("n_heads", True)]:
        e = json.loads(json.dumps(d))
        e["cfg"][key] = value
        _refused(lambda e=e: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", key, repr(value))
    e = json.loads(json.dumps(d))
    e["cfg"] = "x"
    _refused(lambda: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", "cfg", "str")
    # EAP-IG's own files have no n_kv_heads; a graph of unknown d_model reads any d_model
    e = json.loads(json.dumps(d))
    del e["cfg"]["n_kv_heads"]
    assert C.Circuit.from_json(G, e).n_edges == 10
    assert C.Circuit.from_json(C.Graph(2, 4, 2), d).n_edges == 10


def test_from_json_refuses_a_file_that_does_not_list_every_edge(tmp_path, circuit_file):
    _, d = circuit_file
    n = len(d["edges"])
    e = json.loads(json.dumps(d))
    e["edges"] = {k: v for i, (k, v) in enumerate(d["edges"].items()) if i % 2 == 0}
    _refused(lambda: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", f"{len(e['edges'])} of the {n}")
    e["edges"] = {}
    _refused(lambda: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", f"0 of the {n}")


def test_from_json_refuses_non_finite_or_non_numeric_scores(tmp_path, circuit_file):
    _, d = circuit_file
    first = next(iter(d["edges"]))
    for bad in (float("nan"), "inf", float("inf"), [1.0]):
        e = json.loads(json.dumps(d))
        e["edges"][first]["score"] = bad
        _refused(lambda e=e: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", first, "score")
    e = json.loads(json.dumps(d))
    e["edges"][first]["score"] = None  # no score: 0
    assert float(C.Circuit.from_json(G, e).scores[G.edge_index(first)]) == 0.0


def test_from_json_damaged_files_name_the_file(tmp_path, circuit_file):
    path, d = circuit_file
    s = path.read_text()
    p = _write(tmp_path, s[: len(s) // 2], "trunc.json")
    _refused(lambda: C.Circuit.from_json(G, p), str(p), "JSON")
    p = tmp_path / "p.json"
    p.write_bytes(pickle.dumps(d))
    _refused(lambda: C.Circuit.from_json(G, p), str(p), "JSON")
    p = _write(tmp_path, "[1, 2]", "list.json")
    _refused(lambda: C.Circuit.from_json(G, p), str(p), "list")
    missing = tmp_path / "nope.json"
    _refused(lambda: C.Circuit.from_json(G, missing), str(missing), "does not exist", exc=FileNotFoundError)
    e = json.loads(s)
    e["edges"] = [1]
    _refused(lambda: C.Circuit.from_json(G, _write(tmp_path, e)), "x.json", "edges", "list")
    assert torch.equal(C.Circuit.from_json(G, path).edges, C.Circuit.from_json(G, d).edges)


def test_grouped_scores_are_the_sum_over_query_heads_and_round_trip_exactly(tmp_path):
    s = _scores()
    d = s.to_json()
    copies = [f"a0.h0->a1.h{h}<k>" for h in range(2)]  # query heads 0 and 1 share KV head 0
    for i, name in enumerate(copies):
        d["edges"][name] = {"score": float(i + 1), "in_graph": True}
    c = C.Circuit.from_json(G, d)
    assert float(c.scores[G.edge_index("a0.h0->a1.kv0<k>")]) == 3.0  # mechkit's grouped score: the sum
    back = C.Circuit.from_json(G, s.to_json(tmp_path / "s.json"))
    assert torch.equal(back.scores, s.matrix) and back.n_edges == G.n_edges
    half = s.circuit(12, prune=False)
    again = C.Circuit.from_json(G, half.to_json(tmp_path / "h.json"))
    assert torch.equal(again.edges, half.edges) and torch.equal(again.scores, half.scores)


def test_graphs_of_another_d_model_differ():
    assert C.Graph(4, 8, 8, d_model=64) != C.Graph(4, 8, 8, d_model=128)
    assert C.Graph(4, 8, 8, d_model=64) == C.Graph(4, 8, 8) == C.Graph(4, 8, 8, d_model=128)  # unknown: equal
    assert hash(C.Graph(4, 8, 8, d_model=64)) == hash(C.Graph(4, 8, 8))
    m = mk.load("tiny-gpt2")
    task = mk.tasks.ioi(m.tokenizer, n=2, seed=0)
    g = C.Graph.from_model(m)
    other = C.Graph(g.n_layers, g.n_heads, g.n_kv_heads, g.parallel, g.d_model + 1)
    _refused(lambda: C.evaluate(m, task, C.Circuit.full(other)), "built for")
    d = C.Circuit.full(other).to_json()
    _refused(lambda: C.Circuit.from_json(g, d), f"d_model={g.d_model + 1}")


# --------------------------------------------------------------------------- EdgeScores.save / load
@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "s.safetensors"
    s = _scores()
    s.save(p)
    return p, s, json.loads((tmp_path / "s.safetensors.json").read_text())


def _header(p, h):
    p.with_name(p.name + ".json").write_text(h if isinstance(h, str) else json.dumps(h))


def test_edge_scores_round_trip_with_a_checksum(saved, tmp_path):
    p, s, h = saved
    back = C.EdgeScores.load(p)
    assert torch.equal(back.values, s.values) and back.graph == s.graph and back.graph.d_model == 64
    assert back.baselines == s.baselines and back.meta == s.meta and isinstance(h["values_checksum"], str)
    other = tmp_path / "o.safetensors"
    _scores(seed=1).save(other)
    p.write_bytes(other.read_bytes())  # values of another file under this header
    _refused(lambda: C.EdgeScores.load(p), str(p), "checksum")
    _scores().save(p)
    del h["values_checksum"]  # a file saved before the checksum: refused, with what to do
    _header(p, h)
    _refused(lambda: C.EdgeScores.load(p), str(p), "checksum", "save")


def test_edge_scores_header_is_validated(saved):
    p, _, h0 = saved
    for key, value in [("parallel_attn_mlp", "false"), ("n_layers", 4.7), ("d_model", "64"), ("n_heads", 0),
                       ("n_kv_heads", 3)]:
        h = json.loads(json.dumps(h0))
        h["graph"][key] = value
        _header(p, h)
        _refused(lambda: C.EdgeScores.load(p), str(p), key, repr(value))
    for key, value in [("meta", [1]), ("baselines", "x"), ("graph", 3), ("kind", "result")]:
        h = json.loads(json.dumps(h0))
        h[key] = value
        _header(p, h)
        _refused(lambda: C.EdgeScores.load(p), str(p), key)
    h = json.loads(json.dumps(h0))
    h["baselines"] = {"clean": "1.5"}
    _header(p, h)
    _refused(lambda: C.EdgeScores.load(p), str(p), "baselines", "clean")
    for text in (json.dumps(h0)[:30], "[1]"):
        _header(p, text)
        _refused(lambda: C.EdgeScores.load(p), str(p), "JSON")
    h = json.loads(json.dumps(h0))
    h["graph"]["n_heads"], h["graph"]["n_kv_heads"] = 2, 2  # another graph: the values' shape differs
    _header(p, h)
    _refused(lambda: C.EdgeScores.load(p), str(p), "shape")


def test_edge_scores_values_are_validated(saved, tmp_path):
    p, s, h0 = saved
    from mechkit.fingerprint import fingerprint

    def put(values, name="values"):
        save_file({name: values}, str(p))
        _header(p, {**h0, "values_checksum": fingerprint(values)})

    v = s.values.clone()
    v[G.real.nonzero()[5].tolist()] = float("nan")
    put(v)
    _refused(lambda: C.EdgeScores.load(p), str(p), "NaN")
    put(s.values.clone())
    assert C.EdgeScores.load(p).top(1) == s.top(1)
    put((s.values * 1e6).long())
    _refused(lambda: C.EdgeScores.load(p), str(p), "int64")
    put(s.values > 0)
    _refused(lambda: C.EdgeScores.load(p), str(p), "bool")
    put(s.values.clone(), name="x")
    _refused(lambda: C.EdgeScores.load(p), str(p), "'values'")
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    _refused(lambda: C.EdgeScores.load(p), str(p), "safetensors")
    p.write_bytes(pickle.dumps({"values": s.values}))
    _refused(lambda: C.EdgeScores.load(p), str(p), "safetensors")
    p.unlink()
    _refused(lambda: C.EdgeScores.load(p), str(p), "does not exist", exc=FileNotFoundError)
    q = tmp_path / "q.safetensors"
    save_file({"values": s.values}, str(q))
    _refused(lambda: C.EdgeScores.load(q), "q.safetensors.json", "does not exist", exc=FileNotFoundError)
    assert set(load_file(str(q))) == {"values"}


def test_a_header_for_another_d_model_is_refused_on_this_model(tmp_path):
    m = mk.load("tiny-gpt2")
    task = mk.tasks.ioi(m.tokenizer, n=2, seed=0)
    g = C.Graph.from_model(m)
    p = tmp_path / "s.safetensors"
    _scores(C.Graph(g.n_layers, g.n_heads, g.n_kv_heads, g.parallel, 999)).save(p)
    loaded = C.EdgeScores.load(p)
    assert loaded.graph != g
    _refused(lambda: C.faithfulness_curve(m, task, loaded, fractions=[0.5]), "built for")


def test_in_memory_nan_scores_rank_last():
    s = _scores()
    name = s.top(1)[0][0]
    s.values[G.edge_index(name)] = float("nan")
    assert s.top(1)[0][0] != name and s.rank(name) == G.n_edges
    assert len(s.order()) == G.n_edges and bool(G.real.reshape(-1)[s.order()].all())


# --------------------------------------------------------------------------- n arguments
def test_circuit_sizes_must_be_whole_and_non_negative():
    s = _scores()
    for mode in ("topn", "greedy"):
        _refused(lambda mode=mode: s.circuit(10.5, mode=mode), "n", "10.5")
        _refused(lambda mode=mode: s.circuit(-1, mode=mode), "n", "-1")
        _refused(lambda mode=mode: s.circuit(True, mode=mode), "n", "True")
    _refused(lambda: s.top(-3), "n", "-3")
    _refused(lambda: s.top(2.5), "n", "2.5")
    assert len(s.top(0)) == 0 and len(s.top(10**6)) == G.n_edges
    assert s.circuit(torch.tensor(3).item(), prune=False).n_edges == 3
