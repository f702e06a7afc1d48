"""One fact, one place: defaults only in config.SCHEMA, run-folder names only in paths, pruning
methods only in the registry, and the names of runs (hashes, keys) pinned against silent change."""

import ast
import inspect
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pytest
import torch
import yaml
from conftest import curve_by_hand
from matplotlib.colors import to_hex

from prunestudy import config, data, efficiency, execute, graph, machine, methods, paths, prune, report, stages, synth

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
STAGE_FUNCTIONS = {"data": stages.run_data, "train": stages.run_train, "prune": stages.run_prune,
                   "retrain": stages.run_retrain}
# Parameters of the stage functions that say where (inputs, outputs) or how to log, not what.
NOT_PARAMETERS = {"run_dir", "data_dir", "model_dir", "pruned_dir", "out_dir", "log", "launcher", "refresh_cache"}


def _notebook_defaults(stage: str) -> dict:
    nb = nbformat.read(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage], as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


@pytest.mark.parametrize("stage", list(STAGE_FUNCTIONS))
def test_stage_functions_take_their_defaults_from_the_schema(stage):
    signature = inspect.signature(STAGE_FUNCTIONS[stage]).parameters
    mapping = config.stage_parameters(stage)
    assert set(mapping) <= set(signature) and set(signature) - set(mapping) <= NOT_PARAMETERS
    for name, key in mapping.items():
        assert signature[name].default == config.SCHEMA[key][0], f"{stage}: {name} != {key}"


@pytest.mark.parametrize("stage", list(STAGE_FUNCTIONS))
def test_notebook_parameters_cells_agree_with_the_schema(stage):
    found = _notebook_defaults(stage)
    mapping = config.stage_parameters(stage)
    assert set(mapping) <= set(found) and set(found) - set(mapping) <= NOT_PARAMETERS
    for name, key in mapping.items():
        assert found[name] == config.SCHEMA[key][0], f"notebook {stage}: {name} = {found[name]!r}, schema {key}"
    assert found["run_dir"] is None


def test_default_params_file_is_the_schema():
    loaded = config.flatten(yaml.safe_load((ROOT / "params" / "default.yaml").read_text()))
    assert set(loaded) == set(config.SCHEMA), "params/default.yaml lists every parameter once"
    for key, value in loaded.items():
        assert value == config.SCHEMA[key][0], key


def test_library_functions_use_the_schema_defaults():
    build = inspect.signature(data.build_dataset).parameters
    for name, key in config.stage_parameters("data").items():
        if name in build and build[name].default is not inspect.Parameter.empty:  # root: required
            assert build[name].default == config.SCHEMA[key][0], name
    assert {"min_per_class", "classes", "image_size", "seed"} <= set(build)
    gen = inspect.signature(synth.generate).parameters
    assert {k: gen[k].default for k in synth.DEFAULT_PARAMS} == config.SCHEMA["data.embedded"][0]
    assert synth.DEFAULT_PARAMS == config.SCHEMA["data.embedded"][0]


def test_runner_injects_exactly_the_stage_parameters():
    cfg = config.defaults()
    for stage in STAGE_FUNCTIONS:
        injected = execute.notebook_parameters(stage, cfg, Path("/tmp/run"))
        mapping = config.stage_parameters(stage)
        assert set(mapping) <= set(injected) and set(injected) - set(mapping) <= NOT_PARAMETERS


def test_params_hash_and_stage_keys_are_pinned(monkeypatch):
    """A refactor that silently renamed every run folder (and voided every cache) fails here.
    If a change of hashes is intended, say so in the change and update these values. A key also
    holds the digest of the code that computes its stage (graph.code_digest), which changes with any
    edit of that code: the pins fix it (`code=`), so that they pin how parameters and the chain make
    a key; tests/test_codedigest.py checks what the code digest covers."""
    cfg = config.load(ROOT / "params" / "default.yaml")
    assert config.stage_hash(cfg) == "6352af093fd1"   # issue 16 added prune.latency_repeats
    fixed = "0" * 16
    monkeypatch.setattr(machine, "describe", lambda: {"cpu": "pinned", "isa": "avx2", "dispatch": {}, "threads": 2,
                                                    "gpus": []})   # the analysis' key holds the machine
    keys = graph.all_keys(cfg, code=fixed)
    # issue 29: keys hold the code's digest (fixed here); the parameters and the chain are those of issue 14
    assert keys == {"data": "350a7bcd2a32", "train": "beae56b9603f", "prune": "6664eade857d",
                    "retrain": "bb6e10931de8", "analysis": "35c50f5fae07", "control": "b11cdbe80e9b"}
    live = graph.all_keys(cfg)
    assert set(live) == set(keys) and all(live[s] != keys[s] for s in keys)   # the real digest is in every key
    assert graph.chain_keys(cfg) == {s: live[s] for s in graph.CHAIN}
    assert set(execute.notebook_parameters("train", cfg, Path("/elsewhere"))) > set(graph.key_params("train", cfg))


def test_run_folder_names_come_from_paths_only():
    """No module but paths.py spells a run folder's file names."""
    names = [paths.METRICS, paths.MODEL, paths.MASKS, paths.HISTORY, paths.PREDICTIONS, paths.ARCHITECTURE,
             paths.EXPORT, paths.EXPORT_META, paths.REWIND, paths.REWOUND, paths.CHECKPOINT, paths.RESULTS,
             paths.PARAMS, paths.REPORT, paths.STAGE_RECORD, paths.DATA_INFO, *paths.NOTEBOOK_OF.values()]
    for module in (ROOT / "src" / "prunestudy").rglob("*.py"):
        if module.name == "paths.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names, f"{module.relative_to(ROOT)} spells {node.value!r}: use paths"


@pytest.mark.e2e
def test_the_documented_run_folder_matches_paths(smoke_run):
    """Every file and folder the README's "What a run writes" tree names exists after a smoke run,
    and is a name of paths."""
    run_dir, _ = smoke_run
    known = {getattr(paths, n) for n in dir(paths) if n.isupper() and isinstance(getattr(paths, n), str)}
    known |= {paths.images(s) for s in paths.SPLITS} | {paths.labels(s) for s in paths.SPLITS}
    for expected in (paths.PARAMS, paths.RESULTS, paths.REPORT):
        assert (run_dir / expected).is_file()
    for stage in graph.CHAIN:
        assert paths.stage_record(run_dir, stage).is_file() and paths.executed_notebook(run_dir, stage).is_file()
        assert paths.completion_marker(run_dir, stage).is_file()
    for name in (paths.MODEL, paths.HISTORY, paths.METRICS, paths.PREDICTIONS):
        assert (paths.stage_dir(run_dir, "train") / name).is_file()
    for name in (paths.MODEL, paths.MASKS, paths.ARCHITECTURE, paths.EXPORT, paths.EXPORT_META):
        assert (paths.stage_dir(run_dir, "retrain") / name).is_file()
    assert (paths.control_dir(run_dir) / paths.METRICS).is_file()
    assert (paths.curve_point(run_dir, "prune", paths.point_name("l1_unstructured", 0.5)) / paths.METRICS).is_file()
    assert list(paths.figures_dir(run_dir).glob("*.png"))
    readme = (ROOT / "README.md").read_text()
    tree = readme[readme.index("## What a run writes"):]
    tree = tree[:tree.index("\n## ", 5)]
    documented = {w for w in (t.strip(",()") for t in tree.split()) if "." in w and w.split(".")[-1] in
                  {"json", "pt", "npy", "html", "ipynb", "png"} and "*" not in w and "<" not in w}
    assert documented and documented <= known | {"train_images.npy", "test_images.npy"}, documented - known


# --- the registry ------------------------------------------------------------------------------
def _first_weights(model, layers, amount, *, seed=0, example_input=None):
    """A toy method: the first round(amount x size) weights of each layer, by flat index."""
    from torch.nn.utils import prune as tprune

    for _, module in layers:
        keep = torch.ones_like(module.weight).flatten()
        keep[: round(amount * keep.numel())] = 0
        tprune.custom_from_mask(module, "weight", keep.view_as(module.weight))


@pytest.fixture
def toy_method():
    toy = methods.register(methods.Method(
        "toy_first", "masked", _first_weights, about="the first weights of each layer, by index",
        phrase="{amount} of each layer's first weights", color="#123456", marker="P"))
    yield toy
    methods.unregister(toy.name)


@pytest.mark.e2e
def test_a_method_added_through_the_registry_alone_runs_through_prune_efficiency_and_report(toy_method, tmp_path):
    assert "toy_first" in config.choices("prune.method")
    cfg = config.load(ROOT / "params" / "smoke.yaml", ["prune.method=toy_first", "prune.methods=[toy_first]"])
    assert cfg["prune"]["method"] == "toy_first"
    model = stages.models.build_model("seed_cnn")
    dense = prune.clone(model)
    prune.apply(model, "toy_first", 0.25)
    assert prune.sparsity(model)["global_sparsity"] == pytest.approx(0.25, abs=1e-6)
    eff = efficiency.summary(model, dense, batch_sizes=(2,), repeats=2, warmup=1, devices=("cpu",))
    assert eff["macs"] == eff["dense_macs"] and eff["effective_macs"] < eff["dense_macs"]  # masked: dense shape
    # the whole stage chain on a tiny embedded set, then the report's sweep figure and findings
    root = synth.ensure(tmp_path / "coco", seed=1, train_images=24, val_images=12, image_size=96)
    stages.run_data(tmp_path, root=str(root), min_box=8, min_per_class=1)
    stages.run_train(tmp_path, epochs=1, batch_size=16, lr=1e-3, log=lambda m: None)
    pm = stages.run_prune(tmp_path, method="toy_first", amount=0.3, log=lambda m: None)
    curve_by_hand(tmp_path, ["toy_first"], [0.5], latency_repeats=5)
    assert pm["kind"] == "masked" and pm["global_sparsity"] == pytest.approx(0.3, abs=1e-3)
    results = stages.load_results(tmp_path)
    assert [p["method"] for p in results["curve"]] == ["toy_first"]
    assert any("of each layer's first weights" in s for s in report.findings(results))
    fig = report.plot_tradeoff(results)
    colours = {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()}
    assert "#123456" in colours
    assert np.isfinite(results["curve"][0]["test_accuracy_before"])


def test_registry_records_are_checked():
    with pytest.raises(ValueError, match="kind"):
        methods.Method("x", "weird", _first_weights, about="", phrase="{amount}", color="#000000", marker="o")
    with pytest.raises(ValueError, match="amount"):
        methods.Method("x", "masked", _first_weights, about="", phrase="no amount", color="#000000", marker="o")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("l1_unstructured"))
    with pytest.raises(ValueError, match="l1_unstructured"):
        methods.get("nope")
    assert methods.floor() == "random_unstructured"
