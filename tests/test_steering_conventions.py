"""Steering conventions shared with other libraries (issue 16): multiplier=, raw HF models, vector arithmetic."""

from __future__ import annotations

import pytest
import torch
from test_steering import DATA, TOK, make_model

from mechkit.hookpoints import has_mechkit_hooks
from mechkit.steering import DiffMean, LinearAcT


@pytest.fixture(scope="module")
def setup():
    m = make_model("gpt2")
    a = DiffMean(layers=1, point="hook_resid_post").fit(m, DATA.negative, DATA.positive)
    b = DiffMean(layers=2, point="hook_resid_post").fit(m, DATA.negative, DATA.positive)
    return m, a, b


def _ids(m):
    return m.to_tokens(DATA.negative[:3])


def test_multiplier_is_strength(setup):
    m, a, _ = setup
    with a.apply(m, strength=2.5):
        s = m(_ids(m))
    with a.apply(m, multiplier=2.5):
        t = m(_ids(m))
    assert torch.equal(s, t) and not torch.equal(s, m(_ids(m)))
    with pytest.raises(ValueError, match="not both"):
        with a.apply(m, strength=2.0, multiplier=3.0):
            pass
    assert not has_mechkit_hooks(m.hf_model)


def test_raw_hf_model_is_accepted(setup):
    m, a, _ = setup
    ids = _ids(m)
    with a.apply(m, strength=1.5):
        want = m(ids)
        want_gen = m.generate(ids, max_new_tokens=3, do_sample=False)
    raw = m.hf_model
    with a.apply(raw, strength=1.5):  # was: 'GPT2LMHeadModel' object has no attribute 'cfg'
        got = raw(input_ids=ids).logits
        got_gen = raw.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                               pad_token_id=TOK.pad_token_id)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_gen, want_gen)
    a.attach(raw, multiplier=1.5)
    torch.testing.assert_close(raw(input_ids=ids).logits, want)
    a.detach(raw)
    assert not has_mechkit_hooks(raw)


def test_vector_arithmetic(setup):
    m, a, b = setup
    p_a, p_b = a.points[0], b.points[0]
    two = 2 * a
    torch.testing.assert_close(two.tensors[p_a]["v"], 2 * a.tensors[p_a]["v"])
    torch.testing.assert_close((a * 0.5).tensors[p_a]["v"], a.tensors[p_a]["v"] / 2)
    torch.testing.assert_close((a / 4).tensors[p_a]["v"], a.tensors[p_a]["v"] / 4)
    torch.testing.assert_close((-a).tensors[p_a]["v"], -a.tensors[p_a]["v"])
    assert torch.count_nonzero((a - a).tensors[p_a]["v"]) == 0
    both = a + b
    assert set(both.points) == {p_a, p_b}
    ids = _ids(m)
    # 2 * a at strength 1 == a at strength 2; a + b == applying a and b together; the originals are untouched
    with two.apply(m):
        x = m(ids)
    with a.apply(m, strength=2.0):
        y = m(ids)
    torch.testing.assert_close(x, y)
    with both.apply(m):
        z = m(ids)
    with a.apply(m), b.apply(m):
        w = m(ids)
    torch.testing.assert_close(z, w)
    assert a.points == [p_a] and torch.equal(two.tensors[p_a]["v"], 2 * a.tensors[p_a]["v"])


def test_arithmetic_is_refused_where_a_method_has_no_vectors(setup):
    m, a, _ = setup
    act = LinearAcT(layers=1, point="hook_mlp_out").fit(m, DATA.negative, DATA.positive, progress=False)
    with pytest.raises(TypeError, match="no vector arithmetic"):
        act + act
    with pytest.raises(TypeError, match="no vector arithmetic"):
        2 * act
    with pytest.raises(TypeError, match="cannot combine"):
        a + act
    with pytest.raises(TypeError):
        a + 1.0
