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


@pytest.mark.parametrize("cmd", ["patch", "attribute", "path"])
def test_help_names_the_defaults(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for opt, default in [("--n", "32"), ("--seed", "0"), ("--top", "5")]:
        assert re.search(rf"{opt} \w+ .*?\(default: {default}\)", text), (opt, text)
    if cmd != "path":
        assert "(default: resid_pre)" in text and "(default: layer,pos;" in text
        assert "--site" in text and "attn_out" in text and "--by" in text


def test_models_prints_names_only(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == mk.list_models()
    assert "done in" not in out.err
