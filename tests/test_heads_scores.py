"""Head scores: a hand-built induction circuit, agreement with a per-head reference loop and
with TransformerLens's head_detector ranking, copying scores, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import random_hf_model, random_tokens
from heads_handbuilt import V, handbuilt_induction_model

import mechkit as mk
from mechkit.heads import head_scores
from mechkit.heads.scores import target_masks


def repeated_perm_tokens(n: int, T: int, seed: int = 0) -> torch.Tensor:
    """BOS(0) + x + x with x a random arrangement of distinct ids 1..V-1 (no accidental repeats)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randperm(V - 1, generator=g)[:T] + 1 for _ in range(n)])
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), x, x], 1)


@pytest.fixture(scope="module")
def handbuilt():
    return mk.load(handbuilt_induction_model())


def test_handbuilt_heads_score_as_built(handbuilt):
    s = head_scores(handbuilt, tokens=repeated_perm_tokens(8, 18))
    ind, prev = s["induction"].values, s["previous_token"].values
    assert prev[0, 0] >= 0.95, prev
    assert ind[1, 0] >= 0.95, ind
    # L0H1 and L1H1 attend uniformly (zero query/key weights)
    for kind in ("induction", "previous_token", "duplicate", "anti_induction"):
        assert s[kind].values[:, 1].max() <= 0.1, (kind, s[kind].values)
    # the built heads are not the other kinds
    assert ind[0, 0] < 0.2 and prev[1, 0] < 0.2 and s["duplicate"].values[:, 0].max() < 0.2
    # the induction head copies (its OV maps a token to its own logit); uniform heads write nothing
    assert s["copying"].values[1, 0] > 0.9
    assert s["copying"].values[:, 1].abs().max() < 1e-6
    # L0H0 writes the previous token where the unembedding reads only a constant: no OV circuit
    assert s["copying"].values[0, 0].abs() < 1e-6
    fig = s["induction"].figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 2


def test_offset_targets_on_repeated_tokens():
    """On BOS + x + x with distinct x the token-defined targets are exactly the offset diagonals."""
    T = 7
    toks = repeated_perm_tokens(3, T, seed=1)
    m = target_masks(toks, torch.ones_like(toks))
    q = torch.arange(T + 1, 2 * T + 1)
    for kind, off in [("induction", -T + 1), ("duplicate", -T), ("anti_induction", -T - 1)]:
        want = torch.zeros(1 + 2 * T, 1 + 2 * T, dtype=torch.bool)
        want[q, q + off] = True  # anti-induction at q = T + 1 targets k = 0, the BOS before x_1
        assert torch.equal(m[kind][0], want), kind


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_scores_equal_reference_loop(family):
    """One forward pass + masks == a plain loop over rows, heads and query positions (left padding too)."""
    model = mk.load(random_hf_model(family))
    T = 6
    x = random_tokens(3, T, vocab=50, seed=3)
    toks = torch.cat([torch.zeros(3, 1, dtype=torch.long), x, x], 1)
    mask = torch.ones_like(toks)
    toks[0, :2], mask[0, :2] = 0, 0  # row 0 left-padded by 2
    s = head_scores(model, kinds=("induction", "previous_token", "sink", "duplicate"), tokens=toks, attention_mask=mask)
    _, cache = model.run_with_cache(toks, attention_mask=mask, names=lambda n: n.endswith("hook_pattern"))
    c = model.cfg
    for kind in ("induction", "previous_token", "sink", "duplicate"):
        ref = torch.zeros(c.n_layers, c.n_heads)
        for l in range(c.n_layers):
            A = cache[f"blocks.{l}.attn.hook_pattern"]
            for h in range(c.n_heads):
                tot, rows = 0.0, 0
                for b in range(3):
                    real = mask[b].nonzero().flatten().tolist()
                    t = toks[b]
                    for q in real:
                        if kind == "induction":
                            ks = [k for k in real if k - 1 in real and k <= q and t[k - 1] == t[q]]
                        elif kind == "duplicate":
                            ks = [k for k in real if k < q and t[k] == t[q]]
                        elif kind == "previous_token":
                            ks = [q - 1] if q - 1 in real else []
                        else:
                            ks = [real[0]]
                        if ks:
                            tot += float(A[b, h, q, ks].sum())
                            rows += 1
                ref[l, h] = tot / rows
        torch.testing.assert_close(s[kind].values, ref, atol=1e-5, rtol=1e-5)


def test_copying_gqa_matches_weight_product():
    """Llama (GQA, no biases): the functional OV read equals norm(W_E) W_V W_O W_U from the weights."""
    hf = random_hf_model("llama", bias_noise=False)
    model = mk.load(hf)
    got = head_scores(model, kinds=("copying",), n_copy_tokens=64)["copying"].values
    c = model.cfg
    toks = mk.heads.scores._sample_tokens(model, 64, 0)
    W_U = hf.lm_head.weight[toks].T.float()
    group = c.n_heads // c.n_kv_heads
    for l in range(c.n_layers):
        layer = hf.model.layers[l]
        x = layer.input_layernorm(hf.model.embed_tokens.weight[toks])  # [S, d]
        v = (x @ layer.self_attn.v_proj.weight.T).unflatten(-1, (c.n_kv_heads, c.d_head))
        v = v - v.mean(0)
        for h in range(c.n_heads):
            W_O = layer.self_attn.o_proj.weight.T[h * c.d_head:(h + 1) * c.d_head]
            M = v[:, h // group] @ W_O @ W_U
            M = M - M.mean(-1, keepdim=True)
            e = torch.linalg.eigvals(M.double())
            assert abs(float(e.detach().sum().real / e.detach().abs().sum()) - float(got[l, h])) < 1e-4


def test_bad_kind_and_no_hooks_left():
    model = mk.load(random_hf_model("gpt2"))
    with pytest.raises(ValueError, match="unknown score kind"):
        head_scores(model, kinds=("induction", "inductoin"))
    assert not mk.hookpoints.has_mechkit_hooks(model.hf_model)


def _tl_vs_mechkit(model, hf_copy, tok, text: str, arch: str = "gpt2"):
    from transformer_lens.head_detector import detect_head
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(arch, hf_model=hf_copy, tokenizer=tok, device="cpu")
    toks = bridge.to_tokens(text)  # what head_detector itself runs on
    tl = detect_head(bridge, text, "induction_head").float()
    ours = head_scores(model, kinds=("induction",), tokens=toks.cpu())["induction"].values
    assert toks.shape[1] == len(text.split()) + 1, "text did not survive the tokenizer round trip"
    return tl, ours


def test_induction_ranking_agrees_with_transformer_lens(tmp_path):
    if "tiny-gpt2" in mk.list_models():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = mk.models.model_path("tiny-gpt2")
        model = mk.load("tiny-gpt2")
        hf_copy = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        tok = AutoTokenizer.from_pretrained(str(path))
        from mechkit.tasks import repeated_tokens

        ids = repeated_tokens(tok, 1, 30, seed=5)[0, 1:]
        text = " ".join(tok.convert_ids_to_tokens(ids.tolist()))
        k = 3
    else:  # the hand-built circuit, with a word tokenizer <s>, t1..t19 (special tokens must not be
        # prefixes of words: transformers 5 splits "w13" into the special "w1" + "3")
        import transformers as tf
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"<s>": 0, **{f"t{i}": i for i in range(1, V)}, "<unk>": V}
        t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tf.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<s>", unk_token="<unk>",
                                   pad_token="<s>").save_pretrained(str(tmp_path))
        tok = tf.AutoTokenizer.from_pretrained(str(tmp_path))
        hf = handbuilt_induction_model()
        model = mk.load(hf, tokenizer=tok)
        hf_copy = copy.deepcopy(hf)
        x = repeated_perm_tokens(1, 18, seed=2)[0, 1:19]
        text = " ".join(f"t{i}" for i in x.tolist() * 2)
        k = 1
    tl, ours = _tl_vs_mechkit(model, hf_copy, tok, text)
    assert ours.shape == tl.shape
    top_tl = set(tl.flatten().topk(k).indices.tolist())
    top_ours = set(ours.flatten().topk(k).indices.tolist())
    assert tl.flatten().argmax() == ours.flatten().argmax(), (tl, ours)
    assert len(top_tl & top_ours) >= k - (k > 1), (tl, ours)
    # scale differs: TL divides by the whole pattern mass, ~T / (2T + 1) for a perfect head
    assert ours.max() > tl.max()


def test_induction_ranking_agrees_with_transformer_lens_on_tiny_llama():
    """The bundled Llama-family model: TransformerLens's head_detector and mechkit agree on the top heads."""
    if "tiny-llama" not in mk.list_models():
        pytest.skip("bundled tiny-llama weights absent")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechkit.tasks import repeated_tokens

    path = mk.models.model_path("tiny-llama")
    model = mk.load("tiny-llama")
    hf_copy = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = repeated_tokens(tok, 1, 30, seed=5)[0, 1:31]
    text = " ".join(tok.convert_ids_to_tokens(ids.tolist() * 2))
    tl, ours = _tl_vs_mechkit(model, hf_copy, tok, text, arch="llama")
    # several near-perfect induction heads tie (~0.96 each), so compare the top set, not the argmax
    top_tl, top_ours = set(tl.flatten().topk(3).indices.tolist()), set(ours.flatten().topk(3).indices.tolist())
    assert len(top_tl & top_ours) >= 2, (top_tl, top_ours)
    assert ours.flatten()[tl.flatten().argmax()] >= 0.8  # TL's top head is an induction head for mechkit too
    assert ours.max() > tl.max()  # TransformerLens's score is capped near T / (2T + 1)
