"""The command line's stdout: the top results as a small table, then the output path; help texts
with their defaults; no timing line for commands that compute nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mechkit as mk
from mechkit.cli import main, top_table


def test_patch_prints_top_cells_then_the_path(tmp_path, model_arg, capsys):
    assert main(["patch", "--model", model_arg, "--n", "4", "--out", str(tmp_path), "--quiet", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(tmp_path / "patch.html") and Path(lines[-1]).exists()
    saved = mk.results.Result.load(tmp_path / "patch_resid_pre.safetensors")
    assert lines[0] == f"activation patching: resid_pre: top 3 of {saved.values.numel()} by |score|"
    assert lines[1].split() == ["#", "layer", "pos", "score"]
    for i, (labels, v) in enumerate(saved.top(3)):  # each row: rank, the cell's labels, its score
        assert lines[2 + i].split() == [str(i + 1), *labels, f"{v:+.4f}"]


def test_top_table_aligns_labels_with_spaces():
    import torch

    res = mk.results.Result(torch.tensor([[0.1, -2.0], [0.5, 0.0]]), ("layer", "head"))
    table = top_table("z", res, 2).splitlines()
    assert table[0] == "z: top 2 of 4 by |score|"
    assert [r.split() for r in table[1:]] == [["#", "layer", "head", "score"], ["1", "0", "1", "-2.0000"],
                                              ["2", "1", "0", "+0.5000"]]
    assert len({len(r) for r in table[1:]}) == 1  # aligned columns


def test_top_ranks_by_the_change_from_the_unpatched_value():
    """A patching result whose cells read 1 where nothing changed (path patching, noising) ranks its cells
    by their distance from that value, not by |value|; NaN cells (no such cell) come last."""
    import math

    import torch

    res = mk.results.Result(torch.tensor([[1.0, 0.1], [math.nan, 1.5]]), ("layer", "head"),
                            baselines={"clean": 2.0, "corrupt": 0.5, "unpatched": 1.0})
    assert [labels for labels, _ in res.top(3)] == [("0", "1"), ("1", "1"), ("0", "0")]
    assert res.top(4)[-1][0] == ("1", "0")
    assert top_table("path", res, 1).splitlines()[0] == "path: top 1 of 4 by |score - 1.0000| (1.0000: unpatched)"
    plain = mk.results.Result(torch.tensor([0.2, math.nan, -0.5]), ("head",))  # no such value: |score|
    assert [labels for labels, _ in plain.top(3)] == [("2",), ("0",), ("1",)]


def test_path_patching_top_cells_are_the_heads_that_matter(tmp_path, capsys):
    """tiny-gpt2's IOI route (its model card): L0H1's output reaches L3H5's keys and values and carries most of
    the effect; path patching's top cell is that head (its normalised score is far from 1, the unpatched
    value), also in the command line's table."""
    model = mk.load("tiny-gpt2")
    task = mk.tasks.ioi(model.tokenizer, n=8, seed=0)
    res = mk.path_patch(model, task, receivers=[(3, 5, "k"), (3, 5, "v")], progress=False)
    assert res.baselines["unpatched"] == 1.0
    (labels, value), *_ = res.top(1)
    assert labels == ("0", "H1") and value < 0.5, res.top(3)
    assert main(["path", "--model", "tiny-gpt2", "--receivers", "3.5.k,3.5.v", "--n", "8", "--quiet", "--top", "1",
                 "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["1", "0", "H1", f"{value:+.4f}"]
    noised = mk.activation_patch(model, task, sites="z", by=("layer", "head"), mode="noise", progress=False)
    assert noised.baselines["unpatched"] == 1.0
    raw = mk.activation_patch(model, task, sites="z", by=("layer", "head"), normalise=False, progress=False)
    assert raw.baselines["unpatched"] == raw.baselines["corrupt"]


@pytest.mark.parametrize("cmd", ["patch", "attribute", "path"])
def test_help_names_the_defaults(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for opt, default in [("--n", "32"), ("--seed", "0"), ("--top", "5")]:
        assert re.search(rf"{opt} \w+ .*?\(default: {default}\)", text), (opt, text)
    if cmd != "path":
        assert "(default: resid_pre)" in text and "(default: the site's own" in text
        assert "--site" in text and "attn_out" in text and "--by" in text


def test_models_prints_names_only(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == mk.list_models()
    assert "done in" not in out.err


def _options(cmd: str) -> dict:
    """{option: its argparse action} of a subcommand."""
    from mechkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices[cmd]
    return {a.option_strings[-1]: a for a in sub._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("cmd", ["demo", "patch", "attribute", "path", "circuit", "heads", "steer"])
def test_every_option_says_what_it_does_and_its_default(cmd):
    """Each option of each command has a help text, which names its default where it has one; a command
    takes no option it ignores (steer writes nothing and prints no table; demo prints no table)."""
    opts = _options(cmd)
    for name, a in opts.items():
        assert a.help, (cmd, name)
        takes_value = a.nargs != 0
        if takes_value and a.default is not None and not a.required:
            assert "%(default)s" in a.help or "default" in a.help, (cmd, name, a.help)
    if cmd in ("demo", "steer"):
        assert "--top" not in opts
    if cmd == "steer":
        assert "--out" not in opts


def test_circuit_prints_the_top_edges_then_the_dashboard(tmp_path, capsys):
    """Like the other commands: the best method's top edges (score and exact effect) as a table, the summary
    line, and the dashboard's path last."""
    assert main(["circuit", "--model", "tiny-gpt2", "--methods", "eap", "--n", "4", "--quiet", "--top", "3",
                 "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(tmp_path / "dashboard.html") and Path(lines[-1]).exists()
    assert lines[0].startswith("eap edges: top 3 of ")
    assert lines[1].split() == ["#", "edge", "score", "exact"]
    scores = mk.circuits.EdgeScores.load(tmp_path / "edges_eap.safetensors")
    for i, (name, v) in enumerate(scores.top(3)):
        row = lines[2 + i].split()
        assert row[:3] == [str(i + 1), name, f"{v:+.4f}"], row
    assert any(line.startswith("best: eap") for line in lines)


def test_circuit_evaluation_shows_a_progress_bar_unless_silenced(capfd):
    """Exact evaluation (curves, single edges) is a long job on big graphs: a bar by default, none with
    progress=False or the command line's --quiet."""
    from mechkit import circuits as C

    model = mk.load("tiny-gpt2")
    task = mk.tasks.ioi(model.tokenizer, n=4, seed=0)
    capfd.readouterr()  # the load's own output
    C.edge_patching(model, task, ["m2->logits", "a0.h1->a3.h5<k>"])
    assert "circuits" in capfd.readouterr().err
    C.edge_patching(model, task, ["m2->logits"], progress=False)
    assert capfd.readouterr().err == ""
    assert main(["circuit", "--model", "tiny-gpt2", "--methods", "eap", "--n", "4", "--quiet", "--out", "/tmp/q"]) == 0
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err


@pytest.mark.parametrize("site,by", [("neurons", ["layer", "neuron"]), ("z", ["layer", "head"]),
                                     ("resid_pre", ["layer", "pos"])])
def test_cli_by_defaults_to_the_sites_own_axes(tmp_path, capsys, site, by):
    """Without --by a command uses the site's own default axes, as the Python call does (neurons: layer x neuron)."""
    assert main(["attribute", "--model", "tiny-gpt2", "--site", site, "--n", "4", "--quiet", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[1:-1] == by
