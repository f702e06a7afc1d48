import yaml

from prunestudy import cli, config, execute


def test_params_prints_the_effective_parameters(capsys):
    assert cli.main(["params", "-f", "params/default.yaml", "-p", "prune.amount=0.5"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["prune"]["amount"] == 0.5 and shown["train"]["epochs"] == 10
    assert f"params hash: {config.stage_hash(shown)}" in out


def test_bad_parameters_exit_2_listing_each_problem(capsys):
    assert cli.main(["params", "-p", "train.epochs=-1", "-p", "retrain.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs must be at least 1" in err
    assert "did you mean 'retrain.lr'" in err


def test_kernel_command_points_at_this_python(capsys):
    import json
    import sys

    from prunestudy import kernels

    assert cli.main(["kernel"]) == 0
    spec = json.loads((execute.kernel_dir() / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["env"]["GLIBC_TUNABLES"] == kernels.MALLOC_TUNABLES   # see prunestudy.kernels


HEAVY = ("torch", "pandas", "seaborn", "matplotlib", "scipy", "papermill")


def test_the_command_line_and_the_sweep_workers_start_without_the_heavy_libraries():
    """`prunestudy --help`, `kernel`, `lab` and `cache` answered after importing PyTorch, pandas, seaborn
    and scipy (3.4 s here); a sweep's pool workers imported PyTorch too, although their kernels do
    the work. They import what a command needs when it runs."""
    import subprocess
    import sys

    probe = ("import sys, prunestudy.cli, prunestudy.sweep, prunestudy.pipeline, prunestudy.grid, prunestudy.status, "
             "prunestudy.execute, prunestudy.graph, prunestudy.codedigest, prunestudy.machine, prunestudy.runlock; "
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "prunestudy.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "compare" in helped.stdout and "sweep" in helped.stdout


def test_compare_help_names_its_default_page(capsys):
    import pytest

    from prunestudy import paths

    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert f"default: {paths.COMPARE_PAGE}" in capsys.readouterr().out
