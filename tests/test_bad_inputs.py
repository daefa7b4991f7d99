"""Bad inputs, crafted files and misuse: each is refused with one clear sentence.

One table: (case, call, expected error type, a phrase of its message). For every row the test
also checks that the message is one line, that the error is raised by mechkit (not from inside
torch, transformers, json, tomllib or difflib, and not chained to such a traceback), and that
the model carries no hooks and unchanged weights afterwards. The CLI cases exit non-zero with
one line on stderr. Silent-wrong-result classes that need more than one call have their own
tests below the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mechkit as mk
from mechkit.fingerprint import weights_fingerprint
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.patching import activation_patch
from mechkit.tasks.base import PatchingTask

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = ("torch", "transformers", "json", "tomllib", "difflib", "safetensors", "tokenizers")

pytestmark = pytest.mark.skipif("tiny-gpt2" not in mk.list_models(), reason="needs the bundled tiny-gpt2")


@pytest.fixture(scope="module")
def m():
    return mk.load("tiny-gpt2", dtype="float32")


@pytest.fixture(scope="module")
def files(m, tmp_path_factory):
    """Crafted files: steering files (good and broken), hook maps, folders."""
    d = tmp_path_factory.mktemp("bad")
    st = mk.steering.DiffMean(layers=[1, 2], point="hook_resid_post").fit(m, ["the food was bad", "awful"], ["the food was good", "great"])
    good = d / "good.safetensors"
    st.save(good)
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["mechkit_steering"])
    name = "blocks.1.hook_resid_post|v"

    def steering(fname, tensors=tensors, meta=meta, raw_meta=None):
        save_file(tensors, str(d / fname), metadata={"mechkit_steering": raw_meta if raw_meta is not None
                                                     else json.dumps(meta)})
        return d / fname

    out = {"good": good, "dir": d}
    out["st_shape1"] = steering("shape1.safetensors", dict(tensors, **{name: torch.ones(1)}))
    out["st_nan"] = steering("nan.safetensors", dict(tensors, **{name: tensors[name].clone().fill_(float("nan"))}))
    out["st_inf"] = steering("inf.safetensors", dict(tensors, **{name: tensors[name].clone().fill_(float("inf"))}))
    out["st_int"] = steering("int.safetensors", dict(tensors, **{name: tensors[name].long()}))
    out["st_2d"] = steering("2d.safetensors", dict(tensors, **{name: tensors[name][None]}))
    out["st_extra"] = steering("extra.safetensors", dict(tensors, **{"blocks.3.hook_resid_post|v": tensors[name].clone()}))
    out["st_badkey"] = steering("badkey.safetensors", dict(tensors, **{"blocks.1.hook_resid_post|w": tensors[name].clone()}))
    out["st_nobar"] = steering("nobar.safetensors", dict(tensors, **{"stray": tensors[name].clone()}))
    out["st_missing"] = steering("missing.safetensors", {k: v for k, v in tensors.items() if k != name})
    out["st_json"] = steering("json.safetensors", raw_meta='{"method": "diffmean", ')
    out["st_list"] = steering("list.safetensors", raw_meta="[1, 2]")
    out["st_points"] = steering("points.safetensors", meta=dict(meta, points="blocks.1.hook_resid_post"))
    out["st_hparams"] = steering("hparams.safetensors", meta=dict(meta, hparams=dict(meta["hparams"], bogus=1)))
    out["st_hparams_list"] = steering("hparams_list.safetensors", meta=dict(meta, hparams=[1]))
    out["st_model"] = steering("model.safetensors", meta={**meta, "model": {"family": "gpt2"}})
    out["st_layer"] = steering("layer.safetensors", {"blocks.9.hook_resid_post|v": tensors[name]},
                               meta=dict(meta, points=["blocks.9.hook_resid_post"]))
    out["st_unknown_pt"] = steering("unknown_pt.safetensors", {"blocks.1.hook_bogus|v": tensors[name]},
                                    meta=dict(meta, points=["blocks.1.hook_bogus"]))
    out["st_garbage"] = d / "garbage.safetensors"
    out["st_garbage"].write_bytes(b"\x00\x01not a safetensors file")
    gpt2_toml = (ROOT / "mechkit" / "hooks" / "gpt2.toml")
    if not gpt2_toml.exists():
        gpt2_toml = ROOT / "hooks" / "gpt2.toml"
    text = gpt2_toml.read_text()
    out["toml_nol"] = d / "nol.toml"
    out["toml_nol"].write_text(text.replace('block = "transformer.h.{l}"', 'block = "transformer.h.0"'))
    assert out["toml_nol"].read_text() != text
    out["toml_parse"] = d / "parse.toml"
    out["toml_parse"].write_text(text + "\n[points\n")
    out["toml_nofam"] = d / "nofam.toml"
    out["toml_nofam"].write_text(text.replace('final_norm = "transformer.ln_f"', ""))
    out["toml_wrong"] = d / "wrong.toml"  # resid_post read from the attention output: the decomposition fails
    out["toml_wrong"].write_text(text.replace(
        '"blocks.{l}.hook_resid_post" = { module = "{block}", side = "output" }',
        '"blocks.{l}.hook_resid_post" = { module = "{block}.attn", side = "output" }'))
    assert out["toml_wrong"].read_text() != text
    out["toml_missing"] = d / "absent.toml"
    wo = d / "weights_only"
    wo.mkdir()
    src = mk.models.model_path("tiny-gpt2")
    for f in ("config.json", "model.safetensors"):
        (wo / f).write_bytes((src / f).read_bytes())
    out["weights_only"] = wo
    tc = d / "truncated_config"
    tc.mkdir()
    (tc / "config.json").write_text((src / "config.json").read_text()[:40])
    (tc / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    out["truncated_config"] = tc
    out["task_answer_list"] = d / "answer_list.jsonl"
    out["task_answer_list"].write_text(json.dumps({"clean": "a b", "corrupt": "a c", "answer": [" b"], "wrong": " c"}) + "\n")
    out["task_clean_number"] = d / "clean_number.jsonl"
    out["task_clean_number"].write_text(json.dumps({"clean": "a b", "corrupt": "a c", "answer": " b", "wrong": " c"}) + "\n"
                                        + json.dumps({"clean": 3, "corrupt": "a c", "answer": " b", "wrong": " c"}) + "\n")
    res = mk.Result(torch.arange(6.0).reshape(2, 3), ("a", "b"))
    for tag in ("flipped", "header", "labels"):
        res.save(d / f"res_{tag}.safetensors")
        out[f"res_{tag}"] = d / f"res_{tag}.safetensors"
    raw = bytearray(out["res_flipped"].read_bytes())
    raw[-1] ^= 0x01
    out["res_flipped"].write_bytes(bytes(raw))
    hdr = json.loads((d / "res_header.safetensors.json").read_text())
    (d / "res_header.safetensors.json").write_text(json.dumps({k: v for k, v in hdr.items() if k != "axes"}))
    for tag, edit in (("nosum", lambda h: {k: v for k, v in h.items() if k != "values_checksum"}),
                      ("basestr", lambda h: dict(h, baselines={"unpatched": "0"})),
                      ("baseinf", lambda h: dict(h, baselines={"unpatched": float("inf")})),
                      ("labelstr", lambda h: dict(h, labels={"a": "ab", "b": ["0", "1", "2"]})),
                      ("axisnum", lambda h: dict(h, axes=[1, "b"]))):
        res.save(d / f"res_{tag}.safetensors")
        hp = d / f"res_{tag}.safetensors.json"
        hp.write_text(json.dumps(edit(json.loads(hp.read_text()))))
        out[f"res_{tag}"] = d / f"res_{tag}.safetensors"
    mk.Result(torch.arange(6).reshape(2, 3), ("a", "b")).save(d / "res_int.safetensors")
    out["res_int"] = d / "res_int.safetensors"
    hdr = json.loads((d / "res_labels.safetensors.json").read_text())
    hdr["labels"]["b"] = ["x"]
    (d / "res_labels.safetensors.json").write_text(json.dumps(hdr))
    return out


def one_token_tokenizer(f):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(f["weights_only"]))  # what a weights-only folder gives


def ioi(m, n=4):
    return mk.tasks.ioi(m.tokenizer, n=n, seed=0)


def right_padded(m):
    t = ioi(m)
    mask = t.clean_mask.flip(-1)
    return PatchingTask(t.clean_tokens.flip(-1), t.corrupt_tokens.flip(-1), mask, mask.clone(), t.answer_ids,
                        t.wrong_ids, t.clean_prompts, t.corrupt_prompts)


def hook_returning(m, value):
    with m.hooks({"blocks.0.hook_resid_pre": lambda x, hook: value(x)}):
        return m("the food was")


def apply_steering(m, files, strength):
    st = mk.steering.load(files["good"])
    with st.apply(m, strength=strength):
        return m("the food was")


def answers(m, a):
    return PatchingTask.from_prompts(m, ["When Mary and John went to the store, John gave a drink to"],
                                     ["When Mary and John went to the store, Mary gave a drink to"], a, [" John"])


# (case id, call(m, files), error type, phrase of the message)
CASES = [
    # 4. steering strength and files
    ("steer_strength_nan", lambda m, f: apply_steering(m, f, float("nan")), ValueError, "strength must be a finite"),
    ("steer_strength_inf", lambda m, f: apply_steering(m, f, float("inf")), ValueError, "strength must be a finite"),
    ("steer_strength_str", lambda m, f: apply_steering(m, f, "1"), TypeError, "strength must be a finite"),
    ("steer_attach_nan", lambda m, f: mk.steering.load(f["good"]).attach(m, strength=float("nan")), ValueError,
     "strength"),
    ("steer_merge_inf", lambda m, f: mk.steering.load(f["good"]).merge(m, strength=float("-inf")), ValueError,
     "strength"),
    ("steer_from_token", lambda m, f: mk.steering.load(f["good"]).apply(m, from_token=-1).__enter__(), ValueError,
     "from_token"),
    ("steer_file_shape1", lambda m, f: mk.steering.load(f["st_shape1"]), ValueError,
     r"shape1.safetensors: tensor 'blocks.1.hook_resid_post\|v' has shape \(1,\), expected \(128,\)"),
    ("steer_file_shape1_model", lambda m, f: mk.steering.load(f["st_shape1"], model=m), ValueError, "shape"),
    ("steer_file_2d", lambda m, f: mk.steering.load(f["st_2d"]), ValueError, r"shape \(1, 128\), expected \(128,\)"),
    ("steer_file_nan", lambda m, f: mk.steering.load(f["st_nan"]), ValueError, "nan.safetensors: tensor .* non-finite"),
    ("steer_file_inf", lambda m, f: mk.steering.load(f["st_inf"]), ValueError, "non-finite"),
    ("steer_file_int", lambda m, f: mk.steering.load(f["st_int"]), ValueError, "dtype int64, expected a float"),
    ("steer_file_extra", lambda m, f: mk.steering.load(f["st_extra"]), ValueError,
     "'blocks.3.hook_resid_post' is not in the metadata's points"),
    ("steer_file_badkey", lambda m, f: mk.steering.load(f["st_badkey"]), ValueError, "key 'w'.* expected .*'v'"),
    ("steer_file_nobar", lambda m, f: mk.steering.load(f["st_nobar"]), ValueError, "'stray' is not named"),
    ("steer_file_missing", lambda m, f: mk.steering.load(f["st_missing"]), ValueError,
     r"missing.safetensors: no tensor 'blocks.1.hook_resid_post\|v'"),
    ("steer_file_json", lambda m, f: mk.steering.load(f["st_json"]), ValueError, "json.safetensors: metadata .* not valid JSON"),
    ("steer_file_list", lambda m, f: mk.steering.load(f["st_list"]), ValueError, "metadata .* a JSON object"),
    ("steer_file_points", lambda m, f: mk.steering.load(f["st_points"]), ValueError, "'points' must be a non-empty list"),
    ("steer_file_hparams", lambda m, f: mk.steering.load(f["st_hparams"]), ValueError, "hparams.*bogus"),
    ("steer_file_hparams_list", lambda m, f: mk.steering.load(f["st_hparams_list"]), ValueError, "'hparams' must be"),
    ("steer_file_model", lambda m, f: mk.steering.load(f["st_model"]), ValueError, "'model' lacks .*d_model"),
    ("steer_file_layer", lambda m, f: mk.steering.load(f["st_layer"], model=m), ValueError,
     "blocks.9.hook_resid_post"),
    ("steer_file_layer_nomodel", lambda m, f: mk.steering.load(f["st_layer"]), ValueError, "layer 9, but .* 4 layers"),
    ("steer_file_unknown_point", lambda m, f: mk.steering.load(f["st_unknown_pt"], model=m), ValueError,
     "hook_bogus"),
    ("steer_file_garbage", lambda m, f: mk.steering.load(f["st_garbage"]), ValueError, "not a readable safetensors"),
    ("steer_file_absent", lambda m, f: mk.steering.load(f["dir"] / "nope.safetensors"), FileNotFoundError,
     "no steering file"),
    # 5. user hook maps
    ("hookmap_no_l", lambda m, f: mk.load("tiny-gpt2", hook_map=f["toml_nol"]), ValueError,
     r"nol.toml: \[family\] block 'transformer.h.0' has no '\{l\}'"),
    ("hookmap_parse", lambda m, f: mk.load("tiny-gpt2", hook_map=f["toml_parse"]), ValueError,
     "parse.toml is not valid TOML"),
    ("hookmap_missing_key", lambda m, f: mk.load("tiny-gpt2", hook_map=f["toml_nofam"]), ValueError,
     r"nofam.toml: \[family\] lacks 'final_norm'"),
    ("hookmap_wrong_module", lambda m, f: mk.load("tiny-gpt2", hook_map=f["toml_wrong"]), ValueError,
     "wrong.toml.*layer 0: resid_pre \\+ hook_attn_out \\+ hook_mlp_out"),
    ("hookmap_absent", lambda m, f: mk.load("tiny-gpt2", hook_map=f["toml_missing"]), FileNotFoundError,
     "absent.toml"),
    ("hookmap_dict_no_l", lambda m, f: mk.load("tiny-gpt2", hook_map={
        "family": {"layers": "transformer.h", "block": "transformer.h", "final_norm": "transformer.ln_f",
                   "unembed": "lm_head", "attn_out_proj": "{block}.attn.c_proj", "mlp_down_proj": "{block}.mlp.c_proj"},
        "points": {}}), ValueError, "<dict>: .*block 'transformer.h' has no '{l}'"),
    # 6. tasks
    ("task_right_padded", lambda m, f: right_padded(m), ValueError, "left padded"),
    ("task_unknown_answer", lambda m, f: answers(m, [" Zyxwvut"]), ValueError, "' Zyxwvut' is not in the tokenizer"),
    ("task_answer_out_of_vocab", lambda m, f: activation_patch(m, PatchingTask(**{**ioi(m).__dict__,
                                                                 "answer_ids": torch.tensor([5, 6, 7, 10_000])}),
                                                               progress=False),
     ValueError, "answer id 10000 .* vocabulary"),
    ("task_clean_equals_corrupt", lambda m, f: activation_patch(m, PatchingTask(**{**ioi(m).__dict__,
                                                                  "corrupt_tokens": ioi(m).clean_tokens}),
                                                                progress=False),
     ValueError, "clean and corrupted baselines are equal"),
    ("task_mask_shape", lambda m, f: PatchingTask(**{**ioi(m).__dict__, "clean_mask": ioi(m).clean_mask[:, 1:]}),
     ValueError, "clean_mask"),
    ("task_answers_len", lambda m, f: PatchingTask(**{**ioi(m).__dict__, "answer_ids": torch.tensor([1])}),
     ValueError, "answer_ids"),
    # 3. tokenizers
    ("tokenizer_vocab_1", lambda m, f: mk.load(f["weights_only"], tokenizer=one_token_tokenizer(f)), ValueError,
     "tokenizer= .* 1 token"),
    # unclear errors
    ("prompt_too_long", lambda m, f: m(torch.ones(1, 200, dtype=torch.long)), ValueError,
     "200 positions .* at most 128"),
    ("generate_too_long", lambda m, f: m.generate(torch.ones(1, 120, dtype=torch.long), max_new_tokens=20),
     ValueError, "at most 128"),
    ("truncated_config", lambda m, f: mk.load(f["truncated_config"]), ValueError, "config.json is not valid JSON"),
    ("hook_returns_list", lambda m, f: hook_returning(m, lambda x: x.tolist()), TypeError,
     "hook on 'blocks.0.hook_resid_pre' returned a list"),
    ("hook_returns_float", lambda m, f: hook_returning(m, lambda x: 1.0), TypeError, "returned a float"),
    ("hook_returns_numpy", lambda m, f: hook_returning(m, lambda x: x.detach().numpy()), TypeError,
     "returned a ndarray"),
    ("hook_returns_wrong_shape", lambda m, f: hook_returning(m, lambda x: x[:, :1]), ValueError,
     "'blocks.0.hook_resid_pre' returned a tensor of shape"),
    ("model_none", lambda m, f: m(None), TypeError, "inputs must be"),
    ("hooks_int_key", lambda m, f: m.hooks({0: lambda x, h: x}).__enter__(), TypeError,
     "(hook names must be strings|a hook's name must be a str or a predicate on names); got 0"),
    ("hooks_not_callable", lambda m, f: m.hooks({"blocks.0.hook_resid_pre": 3}).__enter__(), TypeError,
     r"not callable|got item \('blocks.0.hook_resid_pre', 3\)"),
    ("max_batch_tokens_str", lambda m, f: activation_patch(m, ioi(m), max_batch_tokens="8192", progress=False),
     TypeError, "max_batch_tokens must be a positive integer, got '8192'"),
    ("max_batch_tokens_0", lambda m, f: activation_patch(m, ioi(m), max_batch_tokens=0, progress=False),
     ValueError, "max_batch_tokens must be a positive integer, got 0"),
    ("max_batch_tokens_neg", lambda m, f: activation_patch(m, ioi(m), max_batch_tokens=-5, progress=False),
     ValueError, "max_batch_tokens"),
    ("max_batch_tokens_nan", lambda m, f: activation_patch(m, ioi(m), max_batch_tokens=float("nan"), progress=False),
     TypeError, "max_batch_tokens"),
    ("diffmean_empty", lambda m, f: mk.steering.DiffMean().fit(m, [], ["good"]), ValueError,
     "source must be a non-empty list of strings"),
    ("diffmean_token_ids", lambda m, f: mk.steering.DiffMean().fit(m, torch.ones(2, 3, dtype=torch.long), ["good"]),
     TypeError, "source must be a non-empty list of strings, got a Tensor"),
    ("load_linear", lambda m, f: mk.load(torch.nn.Linear(3, 3)), TypeError, "Linear is not a transformers causal LM"),
    # persisted results
    ("result_flipped", lambda m, f: mk.Result.load(f["res_flipped"]), ValueError, "res_flipped.safetensors fails the checksum"),
    ("result_header", lambda m, f: mk.Result.load(f["res_header"]), ValueError, r"res_header.safetensors.json: 'axes'"),
    ("result_labels", lambda m, f: mk.Result.load(f["res_labels"]), ValueError, "res_labels.safetensors: axis 'b' has 3"),
    ("result_no_checksum", lambda m, f: mk.Result.load(f["res_nosum"]), ValueError,
     "res_nosum.safetensors.json has no 'values_checksum'"),
    ("result_baseline_str", lambda m, f: mk.Result.load(f["res_basestr"]), ValueError,
     r"res_basestr.safetensors.json: baseline 'unpatched' must be a finite number, got '0'"),
    ("result_baseline_inf", lambda m, f: mk.Result.load(f["res_baseinf"]), ValueError,
     "baseline 'unpatched' must be a finite number, got inf"),
    ("result_label_str", lambda m, f: mk.Result.load(f["res_labelstr"]), ValueError,
     "res_labelstr.safetensors.json: labels of axis 'a' must be a list of strings"),
    ("result_axis_num", lambda m, f: mk.Result.load(f["res_axisnum"]), ValueError,
     "res_axisnum.safetensors.json: 'axes' must be a list of strings"),
    ("result_int_values", lambda m, f: mk.Result.load(f["res_int"]), ValueError,
     "res_int.safetensors: values have dtype torch.int64, expected a floating"),
    # 7. TransformerLens-style calls
    ("model_unknown_kwarg", lambda m, f: m("the food was", foo=1), TypeError,
     r"unknown keyword arguments \['foo'\].*passed through: \['use_cache'"),
    ("model_return_type", lambda m, f: m("the food was", return_type="str"), ValueError, "return_type must be one of"),
    ("model_prepend_bos_ids", lambda m, f: m(torch.tensor([[5, 6]]), prepend_bos=True), ValueError,
     "prepend_bos=True applies to text"),
    ("model_padding_side", lambda m, f: m(["the food", "the"], padding_side="middle"), ValueError,
     "padding_side must be 'left' or 'right'"),
    ("model_loss_one_token", lambda m, f: m(torch.tensor([[5]]), return_type="loss"), ValueError, "at least 2 tokens"),
    ("generate_tl_only_kwarg", lambda m, f: m.generate("the food", verbose=False), TypeError,
     r"does not take TransformerLens's \['verbose'\]"),
    # indices and counts: a float, a bool or a repeat is not silently truncated or repeated (outside audit)
    ("ig_steps_zero", lambda m, f: mk.attribution_patch(m, ioi(m), method="ig", ig_steps=0, progress=False),
     ValueError, "ig_steps must be a positive integer, got 0"),
    ("ig_steps_float", lambda m, f: mk.attribution_patch(m, ioi(m), method="ig", ig_steps=2.5, progress=False),
     TypeError, "ig_steps must be a positive integer, got 2.5"),
    ("layers_float", lambda m, f: activation_patch(m, ioi(m), layers=[1.9], progress=False), TypeError,
     r"layers: 1.9 is not a layer index \(an int\)"),
    ("layers_bool", lambda m, f: activation_patch(m, ioi(m), layers=[True], progress=False), TypeError,
     "layers: True is not a layer index"),
    ("layers_repeat", lambda m, f: activation_patch(m, ioi(m), layers=[1, 1], progress=False), ValueError,
     "layers: 1 is given twice"),
    ("ablate_head_float", lambda m, f: mk.ablate(m, heads=[(1.7, 3)]).__enter__(), TypeError,
     r"heads: 1.7 is not a layer index \(an int\)"),
    ("shard_float", lambda m, f: activation_patch(m, ioi(m), shard=(0.5, 2), progress=False), ValueError,
     r"shard must be \(rank, world\) ints .*got \(0.5, 2\)"),
    ("top_negative", lambda m, f: mk.Result(torch.zeros(3), ("a",)).top(-2), ValueError,
     "k must be a non-negative integer, got -2"),
    ("hook_returns_bool", lambda m, f: m.run_with_hooks("the food was", fwd_hooks=[("blocks.0.hook_resid_pre",
                                                                                     lambda x, hook: x > 0)]),
     TypeError, "blocks.0.hook_resid_pre.*dtype torch.bool.*expected a floating"),
]




def _assert_clean_error(exc: BaseException) -> None:
    msg = str(exc)
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1].filename
    assert "/mechkit/" in last or "/tests/" in last, f"raised from {last}"
    chained = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if chained is not None:
        inner = traceback.extract_tb(chained.__traceback__)
        bad = [fr.filename for fr in inner if any(f"/{p}/" in fr.filename or fr.filename.endswith(f"/{p}.py")
                                                  for p in FOREIGN)]
        assert not bad, f"chained to a traceback inside {bad[-1]}"


@pytest.mark.parametrize("case,call,exc,phrase", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_clear_sentence(m, files, case, call, exc, phrase):
    before = weights_fingerprint(m)
    with pytest.raises(exc, match=phrase) as info:
        call(m, files)
    _assert_clean_error(info.value)
    assert not has_mechkit_hooks(m.hf_model)
    assert m._attn_users == 0 and m.hf_model.config._attn_implementation != "mechkit"
    assert weights_fingerprint(m) == before


def test_nan_never_reaches_a_forward_pass_from_a_steering(m, files):
    st = mk.steering.load(files["good"])
    st.tensors["blocks.1.hook_resid_post"]["v"] = torch.full((128,), float("nan"))  # corrupted in memory
    with pytest.raises(ValueError, match="non-finite"):
        with st.apply(m):
            m("the food was")
    assert not has_mechkit_hooks(m.hf_model)


def test_weights_only_folder_has_no_tokenizer(files):
    with pytest.warns(UserWarning, match="tokenizer="):
        wo = mk.load(files["weights_only"])
    assert wo.tokenizer is None
    with pytest.raises(ValueError, match="text input needs a tokenizer"):
        wo("the food was")
    ref = mk.load("tiny-gpt2")
    ids = ref.to_tokens("the food was")
    torch.testing.assert_close(wo(ids), ref(ids))  # token ids still work
    with_tok = mk.load(files["weights_only"], tokenizer=ref.tokenizer)
    torch.testing.assert_close(with_tok("the food was"), ref("the food was"))


def test_user_hook_map_with_l_loads_and_reads_each_layer(m, files):
    good = files["dir"] / "good.toml"
    good.write_text(files["toml_nol"].read_text().replace('block = "transformer.h.0"', 'block = "transformer.h.{l}"'))
    u = mk.load("tiny-gpt2", hook_map=good)
    _, c1 = u.run_with_cache("the food was", names=["blocks.2.hook_resid_pre"])
    _, c2 = m.run_with_cache("the food was", names=["blocks.2.hook_resid_pre"])
    torch.testing.assert_close(c1["blocks.2.hook_resid_pre"], c2["blocks.2.hook_resid_pre"])


def test_nested_contexts_exited_out_of_order(m):
    """A then B entered, A exited first: B keeps recording, A stops (the stack removes its own entry)."""
    seen = {"A": 0, "B": 0}

    def rec(tag):
        def fn(x, hook):
            seen[tag] += 1
        return fn

    a = m.hooks({"blocks.1.attn.hook_pattern": rec("A")})
    b = m.hooks({"blocks.1.attn.hook_pattern": rec("B")})
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    m("the food was")
    assert seen == {"A": 0, "B": 1}
    b.__exit__(None, None, None)
    assert not has_mechkit_hooks(m.hf_model) and m.hf_model.config._attn_implementation != "mechkit"
    base = m("the food was")
    # two pattern-preserving ablations exited in entry order: no KeyError, and the survivor still ablates
    with mk.ablate(m, heads=[(1, 2)], how="zero", preserve_pattern=True):
        only_b = m("the food was")
    first = mk.ablate(m, heads=[(0, 1)], how="zero", preserve_pattern=True)
    second = mk.ablate(m, heads=[(1, 2)], how="zero", preserve_pattern=True)
    with ExitStack():
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        out = m("the food was")
        second.__exit__(None, None, None)
    torch.testing.assert_close(out, only_b)
    assert not torch.allclose(out, base)
    assert not has_mechkit_hooks(m.hf_model)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mechkit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)


CLI_CASES = [
    ("steer_nan", lambda f: ["steer", f["good"], "--model", "tiny-gpt2", "--strength", "nan"], "strength"),
    ("steer_bad_file", lambda f: ["steer", f["st_shape1"], "--model", "tiny-gpt2"], "shape1.safetensors"),
    ("task_answer_list", lambda f: ["patch", "--model", "tiny-gpt2", "--task", f["task_answer_list"], "--quiet"],
     "answer_list.jsonl:1: 'answer' must be a string or a token id, got a list"),
    ("task_clean_number", lambda f: ["patch", "--model", "tiny-gpt2", "--task", f["task_clean_number"], "--quiet"],
     "clean_number.jsonl:2: 'clean' must be a string, got a number"),
    ("long_prompt", lambda f: ["steer", f["good"], "--model", "tiny-gpt2", "--prompt", " ".join(["food"] * 200)],
     "at most 128"),
    ("truncated_config", lambda f: ["heads", "--model", f["truncated_config"]], "config.json is not valid JSON"),
]


@pytest.mark.parametrize("case,argv,phrase", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_exits_nonzero_with_one_line(files, case, argv, phrase, tmp_path):
    args = argv(files)
    out = _cli(*args, *([] if args[0] == "steer" else ["--out", tmp_path]))  # steer writes nothing
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "it/s]" not in ln and "Warning" not in ln]
    assert len(lines) == 1, out.stderr
    import re

    assert re.search(phrase, lines[0]), lines[0]


def test_transformer_lens_keywords_have_their_meaning(m):
    ids = m.to_tokens("the food was good and the hotel was")
    hf_loss = m.hf_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(m(ids, return_type="loss"), hf_loss)
    logits, loss = m(ids, return_type="both")
    torch.testing.assert_close(logits, m(ids)) and torch.testing.assert_close(loss, hf_loss)
    per = m(ids, return_type="loss", loss_per_token=True)
    assert per.shape == (1, ids.shape[1] - 1) and torch.allclose(per.mean(), hf_loss)
    assert m(ids, return_type=None) is None
    # prepend_bos=False: no BOS in front (the default adds it)
    no_bos = m("the food was", prepend_bos=False)
    with_bos = m("the food was")
    assert with_bos.shape[1] == no_bos.shape[1] + 1
    torch.testing.assert_close(no_bos, m(m.to_tokens("the food was", prepend_bos=False)))
    # padding_side="right": each prompt's real tokens get the same logits as with left padding
    texts = ["the food was good", "the hotel"]
    left, right = m(texts), m(texts, padding_side="right")
    n = int(m.batch(texts).attention_mask[1].sum())
    torch.testing.assert_close(right[1, :n], left[1, -n:], atol=1e-5, rtol=1e-5)
    # padded loss: only pairs of real tokens count (the same loss as the short prompt alone)
    torch.testing.assert_close(m(texts, return_type="loss", loss_per_token=True)[1].sum() / (n - 1),
                               m(texts[1], return_type="loss"), atol=1e-5, rtol=1e-5)



def test_cache_helpers_take_negative_layers_and_refuse_mismatched_stacks(m):
    """layer=-1 means the last (TransformerLens: the final residual), and a stack sliced to one position
    is refused by apply_ln_to_stack unless pos_slice says which position (batch == positions here)."""
    texts = ["the food was good", "the hotel was bad", "the room was nice", "the staff was rude", "the bar was ok"]
    b = m.batch(texts)
    assert b.input_ids.shape[0] == b.input_ids.shape[1]  # the case that broadcast silently
    _, cache = m.run_with_cache(b)
    for fn in ("decompose_resid", "accumulated_resid", "stack_head_results"):
        full = getattr(cache, fn)()
        torch.testing.assert_close(getattr(cache, fn)(layer=-1), full)
        assert full.shape[0] > 1
    stack = cache.decompose_resid()
    last = stack[:, :, -1]  # [component, batch, d_model]
    with pytest.raises(ValueError, match="shape"):
        cache.apply_ln_to_stack(last)
    torch.testing.assert_close(cache.apply_ln_to_stack(last, pos_slice=-1), cache.apply_ln_to_stack(stack)[:, :, -1])
