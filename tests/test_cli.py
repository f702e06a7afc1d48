import yaml

from prunestudy import cli, config


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

    from prunestudy import pipeline

    assert cli.main(["kernel"]) == 0
    spec = json.loads((pipeline.kernel_dir() / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["env"]["GLIBC_TUNABLES"] == pipeline.kernels.MALLOC_TUNABLES   # see prunestudy.kernels
