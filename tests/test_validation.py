"""Options are validated where they enter (the options dataclasses, so the CLI and library callers alike);
input that is the file's fault is exit 2 and one line naming the file; NaN/Inf never reach an output
silently."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lycotools.cli import main
from lycotools.errors import BadInput

FIX = Path(__file__).resolve().parent.parent / "fixtures"
AD = FIX / "adapters"
BASE = FIX / "sd1" / "base.safetensors"
TUNED = FIX / "sd1" / "tuned.safetensors"
LORA = AD / "sd1_kohya_lora.safetensors"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(res, out: Path, *names):
    """Exit 2, exactly one line on stderr (the error, naming what it must name), no output anywhere."""
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.output)
    assert len(lines) == 1 and lines[0].startswith("lycotools: error: "), res.stderr
    assert "internal error" not in lines[0] and "Traceback" not in res.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp file left behind"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# A. options
# ------------------------------------------------------------------------------------------------

OPTION_CASES = {
    "extract-rank-0": (["extract", BASE, TUNED, "--rank", "0"], "--rank"),
    "extract-rank-neg": (["extract", BASE, TUNED, "--rank", "-3"], "--rank"),
    "extract-conv-rank-0": (["extract", BASE, TUNED, "--conv-rank", "0"], "--conv-rank"),
    "extract-max-rank-0": (["extract", BASE, TUNED, "--mode", "energy", "--mode-param", "0.9", "--max-rank", "0"],
                           "--max-rank"),
    "extract-mode-no-param": (["extract", BASE, TUNED, "--mode", "energy"], "--mode-param"),
    "extract-mode-param-nan": (["extract", BASE, TUNED, "--mode", "energy", "--mode-param", "nan"], "--mode-param"),
    "extract-energy-above-1": (["extract", BASE, TUNED, "--mode", "energy", "--mode-param", "1.5"], "--mode-param"),
    "extract-ratio-0": (["extract", BASE, TUNED, "--mode", "ratio", "--mode-param", "0"], "--mode-param"),
    "extract-threshold-neg": (["extract", BASE, TUNED, "--mode", "threshold", "--mode-param", "-1"], "--mode-param"),
    "extract-conv-mode-param-inf": (["extract", BASE, TUNED, "--mode", "quantile", "--mode-param", "0.5",
                                     "--conv-mode-param", "inf"], "--conv-mode-param"),
    "extract-budget-0": (["extract", BASE, TUNED, "--budget", "0"], "--budget"),
    "extract-budget-neg": (["extract", BASE, TUNED, "--budget", "-1MB"], "--budget"),
    "extract-budget-nan": (["extract", BASE, TUNED, "--budget", "nan"], "--budget"),
    "extract-budget-inf": (["extract", BASE, TUNED, "--budget", "inf"], "--budget"),
    "extract-budget-garbage": (["extract", BASE, TUNED, "--budget", "lots"], "--budget"),
    "extract-min-diff-nan": (["extract", BASE, TUNED, "--min-diff", "nan"], "--min-diff"),
    "extract-lokr-factor-0": (["extract", BASE, TUNED, "--algo", "lokr", "--lokr-factor", "0"], "--lokr-factor"),
    "prune-rank-0": (["rank-prune", LORA, "--rank", "0"], "--rank"),
    "prune-budget-0": (["rank-prune", LORA, "--budget", "0"], "--budget"),
    "prune-budget-nan": (["rank-prune", LORA, "--budget", "nan"], "--budget"),
    "prune-fro-inf": (["rank-prune", LORA, "--mode", "fro", "--mode-param", "inf"], "--mode-param"),
    "prune-ratio-below-1": (["rank-prune", LORA, "--mode", "ratio", "--mode-param", "0.5"], "--mode-param"),
    "prune-max-rank-0": (["rank-prune", LORA, "--rank", "4", "--max-rank", "0"], "--max-rank"),
    "prune-min-rank-neg": (["rank-prune", LORA, "--rank", "4", "--min-rank", "-1"], "--min-rank"),
    "prune-steps-0": (["rank-prune", LORA, "--rank", "4", "--steps", "0"], "--steps"),
    "bake-ratio-nan": (["merge", BASE, f"{LORA}:nan"], LORA),
    "bake-ratio-inf": (["merge", BASE, f"{LORA}:inf"], LORA),
    "bake-block-weights-nan": (["merge", BASE, LORA, "--block-weights", ",".join(["1"] * 16 + ["nan"])],
                               "--block-weights"),
    "bake-block-weights-count": (["merge", BASE, LORA, "--block-weights", "1,1,1"], "--block-weights"),
    "into-svd-rank-neg": (["merge", "--into-adapter", LORA, "--method", "svd", "--rank", "-2"], "--rank"),
    "into-svd-conv-rank-0": (["merge", "--into-adapter", LORA, "--method", "svd", "--rank", "2", "--conv-rank", "0"],
                             "--conv-rank"),
    "into-svd-budget-0": (["merge", "--into-adapter", LORA, "--method", "svd", "--budget", "0"], "--budget"),
    "into-ratio-nan": (["merge", "--into-adapter", f"{LORA}:nan"], LORA),
    "into-fp8": (["merge", "--into-adapter", LORA, "--dtype", "fp8_e4m3fn"], "fp8"),
    "models-alpha-nan": (["merge", "--models", BASE, TUNED, "--alpha", "nan"], "--alpha"),
    "models-alpha-inf": (["merge", "--models", BASE, TUNED, "--method", "add-difference", "--alpha", "inf"], "--alpha"),
    "models-density-0": (["merge", "--models", BASE, TUNED, "--method", "ties", "--density", "0"], "--density"),
    "models-density-above-1": (["merge", "--models", BASE, TUNED, "--method", "ties", "--density", "1.5"], "--density"),
    "models-drop-rate-1": (["merge", "--models", BASE, TUNED, "--method", "dare", "--drop-rate", "1"], "--drop-rate"),
    "models-block-weights-inf": (["merge", "--models", BASE, TUNED, "--block-weights", ",".join(["0.5"] * 16 + ["inf"])],
                                 "--block-weights"),
    "convert-rank-0": (["convert", AD / "sd1_loha.safetensors", "--algo", "lora", "--rank", "0"], "--rank"),
    "convert-rank-neg": (["convert", AD / "sd1_loha.safetensors", "--algo", "lora", "--rank", "-4"], "--rank"),
    "convert-max-rank-0": (["convert", AD / "sd1_loha.safetensors", "--algo", "lora", "--mode", "energy",
                            "--mode-param", "0.9", "--max-rank", "0"], "--max-rank"),
    "convert-mode-no-param": (["convert", AD / "sd1_loha.safetensors", "--algo", "lora", "--mode", "energy"],
                              "--mode-param"),
    "convert-mode-param-nan": (["convert", AD / "sd1_loha.safetensors", "--algo", "lora", "--mode", "ratio",
                                "--mode-param", "nan"], "--mode-param"),
    "convert-adapter-fp8": (["convert", LORA, "--to", "diffusers", "--dtype", "fp8_e5m2"], "fp8"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_cli_refuses_bad_option(case, tmp_path):
    args, name = OPTION_CASES[case]
    out = tmp_path / "out.safetensors"
    assert_refused(cli(*args, "-o", out, "-q"), out, name)


def _lib_cases():
    from lycotools.ops.convert import ConvertOptions
    from lycotools.ops.convert_adapter import AdapterOptions
    from lycotools.ops.extract import ExtractOptions
    from lycotools.ops.merge import AdapterMergeOptions, BakeOptions, ModelMergeOptions
    from lycotools.ops.prune import PruneOptions

    nan, inf = float("nan"), float("inf")
    return {
        "extract-rank-0": (ExtractOptions, dict(rank=0)),
        "extract-rank-neg": (ExtractOptions, dict(rank=-3)),
        "extract-rank-float": (ExtractOptions, dict(rank=2.5)),
        "extract-max-rank-0": (ExtractOptions, dict(mode="energy", mode_param=0.9, max_rank=0)),
        "extract-mode-no-param": (ExtractOptions, dict(mode="energy")),
        "extract-mode-param-nan": (ExtractOptions, dict(mode="ratio", mode_param=nan)),
        "extract-budget-neg": (ExtractOptions, dict(budget="-2M")),
        "extract-dtype-fp8": (ExtractOptions, dict(dtype="fp8_e4m3fn")),
        "prune-none": (PruneOptions, dict()),
        "prune-rank-0": (PruneOptions, dict(rank=0)),
        "prune-energy-0": (PruneOptions, dict(mode="energy", mode_param=0.0)),
        "prune-budget-inf": (PruneOptions, dict(budget="inf")),
        "bake-block-weights-nan": (BakeOptions, dict(block_weights=(",".join(["nan"] * 17),))),
        "bake-dtype": (BakeOptions, dict(dtype="fp64")),
        "adapter-merge-rank-0": (AdapterMergeOptions, dict(method="svd", rank=0)),
        "adapter-merge-svd-nothing": (AdapterMergeOptions, dict(method="svd")),
        "adapter-merge-method": (AdapterMergeOptions, dict(method="ties")),
        "adapter-merge-fp8": (AdapterMergeOptions, dict(dtype="fp8_e5m2")),
        "model-merge-alpha-nan": (ModelMergeOptions, dict(alpha=nan)),
        "model-merge-alpha-inf": (ModelMergeOptions, dict(method="add-difference", alpha=-inf)),
        "model-merge-density": (ModelMergeOptions, dict(method="ties", density=0.0)),
        "model-merge-drop-rate": (ModelMergeOptions, dict(method="dare", drop_rate=-0.1)),
        "convert-rank-0": (ConvertOptions, dict(algo="lora", rank=0)),
        "convert-mode-param-inf": (ConvertOptions, dict(algo="lora", mode="energy", mode_param=inf)),
        "adapter-rank-neg": (AdapterOptions, dict(algo="lora", rank=-1)),
        "adapter-no-rank": (AdapterOptions, dict(algo="lora")),
        "adapter-fp8": (AdapterOptions, dict(dtype="fp8_e4m3fn")),
    }


@pytest.mark.parametrize("case", sorted(_lib_cases()))
def test_options_dataclass_refuses(case):
    cls, kw = _lib_cases()[case]
    with pytest.raises(BadInput) as ei:
        cls(**kw)
    assert ei.value.exit_code == 2 and "\n" not in ei.value.line()


def test_good_options_pass():
    from lycotools.ops.convert import ConvertOptions
    from lycotools.ops.extract import ExtractOptions
    from lycotools.ops.merge import AdapterMergeOptions, BakeOptions, ModelMergeOptions, parse_spec
    from lycotools.ops.prune import PruneOptions

    for b in ("2M", "40MB", "0.05", "300k", "1200000", "1.5GiB"):
        ExtractOptions(budget=b)
        PruneOptions(budget=b)
    ExtractOptions(mode="threshold", mode_param=0.0)
    PruneOptions(mode="ratio", mode_param=4.0, min_rank=0, max_rank=8)
    BakeOptions(block_weights=("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,-0.5"))
    ModelMergeOptions(method="add-difference", alpha=-1.5)  # extrapolation is a finite alpha too
    AdapterMergeOptions(method="svd", budget="0.5")
    ConvertOptions(to="single-file", dtype="fp8_e4m3fn")  # fp8 is a checkpoint dtype
    assert parse_spec(f"{LORA}:-0.5") == (str(LORA), -0.5)  # subtracting an adapter is legitimate


def test_bake_negative_ratio_allowed(tmp_path):
    out = tmp_path / "neg.safetensors"
    res = cli("merge", BASE, f"{LORA}:-0.5", "-o", out, "-q", "--no-date")
    assert res.exit_code == 0, res.stderr
    assert out.exists()


def test_library_ratio_checked(tmp_path):
    from lycotools.ops import merge as M

    out = tmp_path / "o.safetensors"
    with pytest.raises(BadInput, match="finite"):
        M.bake(str(BASE), [(str(LORA), float("nan"))], out, M.BakeOptions(), quiet=True)
    with pytest.raises(BadInput, match="finite"):
        M.merge_adapters([(str(LORA), float("inf"))], out, M.AdapterMergeOptions(), quiet=True)
    assert not out.exists()
