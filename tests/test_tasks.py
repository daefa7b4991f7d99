"""Task generators: IOI, repeated tokens, sentiment, corpus, tokenizer (fast, no models)."""

import random

import pytest
import torch

from mechkit import tasks
from mechkit.tasks import PatchingTask, build_tokenizer, ioi, repeated_tokens, sentiment, vocab
from mechkit.tasks.corpus import documents, ioi_sentence


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """A GPT-2-style byte-level BPE tokenizer trained offline on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(documents(300, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def test_tokenizer_roundtrip_and_autoload(tok, tmp_path):
    from transformers import AutoTokenizer

    text = "When Mary and John went to the store, John gave a drink to Mary."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    tasks.save_tokenizer(tmp_path, tok)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert t2(text)["input_ids"] == ids
    assert (t2.bos_token, t2.eos_token, t2.pad_token, t2.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert 450 <= len(tok) <= 800


@pytest.mark.parametrize("which", ["word", "bpe"])
def test_ioi_aligned_and_correct(which, tok, bpe_tok):
    t = tok if which == "word" else bpe_tok
    task = ioi(t, 40, seed=3)
    assert isinstance(task, PatchingTask) and len(task) == 40
    assert task.clean_tokens.shape == task.corrupt_tokens.shape
    assert torch.equal(task.clean_mask, task.corrupt_mask)
    assert (task.clean_mask[:, -1] == 1).all()  # left padded
    bos = t.bos_token_id
    for i in range(len(task)):
        m = task.clean_mask[i].bool()
        c, x = task.clean_tokens[i][m], task.corrupt_tokens[i][m]
        assert c[0] == bos
        diff = (c != x).nonzero().flatten().tolist()
        assert len(diff) == 1  # only the subject's second mention differs
        # clean has S there, corrupt has IO there
        assert int(c[diff[0]]) == int(task.wrong_ids[i]) and int(x[diff[0]]) == int(task.answer_ids[i])
        io, s = task.meta["io"][i], task.meta["s"][i]
        assert task.answer_ids[i] == t(" " + io, add_special_tokens=False)["input_ids"][0]
        assert task.wrong_ids[i] == t(" " + s, add_special_tokens=False)["input_ids"][0]
        assert task.clean_prompts[i].count(s) == 2 and task.clean_prompts[i].count(io) == 1
        assert task.corrupt_prompts[i].count(io) == 2 and task.corrupt_prompts[i].count(s) == 1
    assert set(task.meta["order"]) == {"ABBA", "BABA"}


def test_ioi_example_and_order(tok):
    task = ioi(tok, 10, seed=0, templates=[0])
    for i in range(10):
        io, s, order = task.meta["io"][i], task.meta["s"][i], task.meta["order"][i]
        first = (io, s) if order == "ABBA" else (s, io)
        assert task.clean_prompts[i].startswith(f"When {first[0]} and {first[1]} went to the ")
        assert task.clean_prompts[i].split(", ")[1].startswith(s + " ")
        assert task.corrupt_prompts[i].split(", ")[1].startswith(io + " ")


def test_ioi_seed_and_splits(tok):
    a, b, c = ioi(tok, 20, seed=5), ioi(tok, 20, seed=5), ioi(tok, 20, seed=6)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and a.clean_prompts == b.clean_prompts
    assert a.clean_prompts != c.clean_prompts
    held = ioi(tok, 30, seed=0, split="heldout")
    assert set(held.meta["io"] + held.meta["s"]) <= set(vocab.IOI_HELDOUT_NAMES)
    train = ioi(tok, 30, seed=0, split="train")
    assert set(train.meta["io"] + train.meta["s"]) <= set(vocab.IOI_TRAIN_NAMES)
    assert not set(vocab.IOI_TRAIN_NAMES) & set(vocab.IOI_HELDOUT_NAMES)


def test_patching_task_slicing_and_to(tok):
    task = ioi(tok, 10, seed=0)
    sub = task[2:5]
    assert len(sub) == 3 and sub.clean_prompts == task.clean_prompts[2:5]
    assert torch.equal(sub.answer_ids, task.answer_ids[2:5]) and sub.meta["io"] == task.meta["io"][2:5]
    assert len(task.to("cpu")) == 10


def test_from_prompts_mismatch_names_prompt(tok):
    clean = ["Mary went home", "Mary went to the park"]
    corrupt = ["John went home", "John went to park"]
    with pytest.raises(ValueError, match="prompt 1"):
        PatchingTask.from_prompts(tok, clean, corrupt, [" Mary", " Mary"], [" John", " John"])

    class Wrapper:
        tokenizer = tok

    t = PatchingTask.from_prompts(Wrapper(), clean[:1], corrupt[:1], [" home"], [" park"])
    assert t.clean_tokens[0, 0] == tok.bos_token_id and t.answer_ids[0] == tok.convert_tokens_to_ids("home")


def test_heldout_names_never_in_corpus_ioi_sentences():
    docs = " ".join(documents(200, seed=0))
    heldout = set(vocab.IOI_HELDOUT_NAMES)
    rng = random.Random(0)
    for _ in range(200):
        s = ioi_sentence(rng)
        assert not heldout & set(s.replace(",", " ").replace(".", " ").split())
    # every held-out name does occur in the corpus (in other sentences)
    words = set(docs.replace(",", " ").replace(".", " ").split())
    assert heldout <= words
    # and no IOI-shaped sentence in the corpus uses a held-out name as its final answer
    for sent in docs.split("."):
        w = sent.replace(",", " ").split()
        if len(w) >= 2 and w[-2] == "to" and any(v in w for v in vocab.GIVE_VERBS + ["give"]):
            assert w[-1] not in heldout, sent


def test_repeated_tokens(tok, bpe_tok):
    for t in (tok, bpe_tok):
        x = repeated_tokens(t, 6, 12, seed=1)
        assert x.shape == (6, 25) and x.dtype == torch.long
        assert (x[:, 0] == t.bos_token_id).all()
        assert torch.equal(x[:, 1:13], x[:, 13:])
        assert not set(x[:, 1:].flatten().tolist()) & set(t.all_special_ids)
        assert torch.equal(x, repeated_tokens(t, 6, 12, seed=1))
        assert not torch.equal(x, repeated_tokens(t, 6, 12, seed=2))
    with pytest.raises(ValueError):
        repeated_tokens(tok, 2, (3, 5), seed=0)


def test_sentiment(tok):
    d = sentiment(tok, 20, seed=0)
    assert len(d.positive) == len(d.negative) == 20 and d.neutral
    pos, neg = set(vocab.POSITIVE_ADJECTIVES), set(vocab.NEGATIVE_ADJECTIVES)
    for p, n in zip(d.positive, d.negative):
        wp, wn = set(p.replace(",", " ").replace(".", " ").split()), set(n.replace(",", " ").replace(".", " ").split())
        assert wp & pos and not wp & neg and wn & neg and not wn & pos
        assert len(tok(p)["input_ids"]) == len(tok(n)["input_ids"])  # paired: same template
    held = sentiment(tok, 30, seed=0, split="heldout")
    used = set(" ".join(held.positive + held.negative).replace(".", " ").replace(",", " ").split())
    assert not used & set(vocab.POSITIVE_TRAIN + vocab.NEGATIVE_TRAIN)
    assert sentiment(tok, 5, seed=1).positive == sentiment(tok, 5, seed=1).positive
    ids = tok(" ".join(d.positive + d.negative + d.neutral))["input_ids"]
    assert tok.unk_token_id not in ids


def test_corpus_tokens_known_and_reproducible(tok):
    docs = documents(20, seed=4)
    assert docs == documents(20, seed=4)
    ids = tok(" ".join(docs))["input_ids"]
    assert tok.unk_token_id not in ids
    assert any(t in " ".join(docs) for t in ("I loved it", "I hated it", "recommend", "avoid"))
