import pytest

from prunestudy import config, graph


def test_defaults_are_the_seed_configuration():
    cfg = config.load("params/default.yaml")
    seed = {k: cfg["train"][k] for k in ("model", "epochs", "batch_size", "lr")}
    assert seed == {"model": "seed_cnn", "epochs": 10, "batch_size": 32, "lr": 1e-4}
    assert cfg["train"]["precision"] == "auto" and cfg["train"]["launcher"] == "none"
    assert cfg["prune"]["amount"] == 0.2 and cfg["prune"]["method"] == "l1_unstructured"
    assert cfg["data"]["image_size"] == 64 and cfg["data"]["root"] == "embedded"


def test_the_curve_file_shares_the_default_studys_stages():
    """params/curve.yaml says it runs on default.yaml's data, training and retraining: its stage keys
    are the default study's, and its l1_unstructured-0.2 point is that study's chain."""
    from prunestudy import paths

    default, curve = (graph.all_keys(config.load(f"params/{n}.yaml")) for n in ("default", "curve"))
    assert {k: curve[k] for k in ("data", "train", "control")} == {k: default[k] for k in ("data", "train", "control")}
    points = {name: graph.all_keys(pcfg) for name, pcfg in paths.curve_points(config.load("params/curve.yaml"))}
    assert len(points) == 16
    assert {k: points["l1_unstructured-0.2"][k] for k in ("prune", "retrain")} == \
        {k: default[k] for k in ("prune", "retrain")}


def test_every_params_file_is_valid_and_sets_only_known_keys():
    for name in ("default", "smoke"):
        config.load(f"params/{name}.yaml")
    # the COCO file needs a root: an error that says how to give it, before any work
    with pytest.raises(config.ParamsError, match=r"data.root=/path/to/coco"):
        config.load("params/coco2017.yaml")
    assert config.load("params/coco2017.yaml", ["data.root=/"])["data"]["root"] == "/"
    with pytest.raises(config.ParamsError, match="data.root '/no/such/coco' is not a folder"):
        config.load("params/coco2017.yaml", ["data.root=/no/such/coco"])


def test_overrides_are_parsed_as_yaml_and_merge_nested_dicts():
    cfg = config.load(None, ["train.epochs=3", "train.lr=1e-3", "data.classes=[circle, star]",
                             "data.embedded.train_images=7"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 1e-3
    assert cfg["data"]["classes"] == ["circle", "star"]
    assert cfg["data"]["embedded"]["train_images"] == 7 and cfg["data"]["embedded"]["val_images"] == 250


def test_all_problems_reported_at_once_with_suggestions():
    with pytest.raises(config.ParamsError) as err:
        config.load(None, ["train.epoch=3", "train.lr=fast", "prune.method=magic", "nonsense"])
    msg = str(err.value)
    assert "did you mean 'train.epochs'" in msg
    assert "train.lr must be float" in msg
    assert "prune.method must be one of" in msg
    assert "'nonsense' is not key=value" in msg
    assert len(err.value.problems) == 4


def test_ranges_checked():
    with pytest.raises(config.ParamsError, match=r"prune.amount must be in \[0, 1\)"):
        config.load(None, ["prune.amount=1.0"])
    with pytest.raises(config.ParamsError, match="train.epochs must be at least 1"):
        config.load(None, ["train.epochs=0"])
    with pytest.raises(config.ParamsError, match="unknown keys"):
        config.load(None, ["data.embedded.colour=red"])


def test_bad_files(tmp_path):
    with pytest.raises(config.ParamsError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(config.ParamsError, match="not valid YAML"):
        config.load(bad)


def test_hash_changes_with_any_parameter():
    a = config.load(None)
    b = config.load(None, ["prune.amount=0.3"])
    assert config.stage_hash(a) == config.stage_hash(config.load(None))
    assert config.stage_hash(a) != config.stage_hash(b)


def test_data_parameters_of_the_coco_stage_are_checked_all_at_once():
    with pytest.raises(config.ParamsError) as err:
        config.load(None, ["data.label_mode=box", "data.max_bad_fraction=1.5", "data.workers=0",
                           "data.min_per_class=0", "data.max_per_class=0"])
    msg = str(err.value)
    assert "data.label_mode must be one of crop, image, got 'box'" in msg
    assert "data.max_bad_fraction must be in [0, 1], got 1.5" in msg
    assert "data.workers must be null (all cores) or at least 1, got 0" in msg
    assert "data.min_per_class must be at least 1" in msg and "data.max_per_class must be null" in msg
    cfg = config.load(None, ["data.label_mode=image", "data.workers=3", "data.max_bad_fraction=0"])
    assert (cfg["data"]["label_mode"], cfg["data"]["workers"], cfg["data"]["max_bad_fraction"]) == ("image", 3, 0.0)


def test_pruning_study_parameters_are_checked_all_at_once():
    from prunestudy import methods

    assert config.choices("prune.method") == methods.names() == tuple(methods.REGISTRY)
    cfg = config.load("params/default.yaml")
    assert (cfg["prune"] | cfg["retrain"]).items() >= {"rounds": 1, "rewind_step": None, "amounts": None,
                                                       "methods": None, "epochs_per_round": 1, "control": True}.items()
    with pytest.raises(config.ParamsError) as err:
        config.load(None, ["prune.rounds=0", "prune.rewind_step=-1", "prune.amounts=[0.5, 1.0]",
                           "prune.methods=[channel, magic]", "retrain.epochs_per_round=-1", "retrain.control=1"])
    msg = str(err.value)
    assert "prune.rounds must be at least 1" in msg and "prune.rewind_step must be null" in msg
    assert "prune.amounts[1] must be a fraction in [0, 1), got 1.0" in msg
    assert "prune.methods[1] must be one of" in msg and "'magic'" in msg
    assert "retrain.epochs_per_round must be 0 or more" in msg and "retrain.control must be bool" in msg
    assert len(err.value.problems) == 6
    # a method that cannot apply to the model, as the main method or in the sweep, and rewinding channels
    with pytest.raises(config.ParamsError, match=r"channel' cannot apply to resnet18 with prune.targets='linear'"):
        config.load(None, ["train.model=resnet18", "prune.method=channel", "prune.targets=linear"])
    with pytest.raises(config.ParamsError, match=r"prune.methods \(the curve\): .*ln_structured' cannot apply"):
        config.load(None, ["train.model=resnet18", "prune.targets=linear", "prune.amounts=[0.5]",
                           "prune.methods=[l1_unstructured, ln_structured]"])
    with pytest.raises(config.ParamsError, match="rewind_step cannot be used with prune.method=channel"):
        config.load(None, ["prune.method=channel", "prune.rewind_step=10"])
    # every sweep point prunes, rewinds and retrains as the study does: a structural method among
    # prune.methods cannot rewind
    with pytest.raises(config.ParamsError, match=r"holds the structural method\(s\) channel, and prune.rewind_step=0"):
        config.load("params/curve.yaml", ["prune.rewind_step=0"])
    ok = config.load("params/curve.yaml", ["retrain.control=false", "prune.rounds=3"])
    assert ok["retrain"]["control"] is False and ok["prune"]["amounts"] == [0.2, 0.5, 0.8, 0.9]
    points = config.curve_points(ok)
    assert [(p["prune"]["method"], p["prune"]["amount"]) for p in points[:2]] == [("l1_unstructured", 0.2),
                                                                                 ("l1_unstructured", 0.5)]
    assert len(points) == 16 and all(p["prune"]["rounds"] == 3 and p["prune"]["amounts"] is None
                                     and p["prune"]["methods"] is None and p["seeds"] is None for p in points)
    assert config.curve_methods({"method": "channel", "methods": None}) == ["channel", "random_unstructured"]
    assert config.curve_methods({"method": "random_unstructured", "methods": None}) == ["random_unstructured"]


def test_training_speed_and_launcher_parameters_are_checked():
    with pytest.raises(config.ParamsError) as err:
        config.load(None, ["train.precision=fp8", "train.launcher=mpirun", "train.nproc_per_node=0",
                           "train.weights=/no/such.pt", "train.channels_last=maybe"])
    msg = str(err.value)
    for part in ("train.precision must be one of auto, fp32, bf16, fp16",
                 "train.launcher must be one of none, torchrun",
                 "train.nproc_per_node must be at least 1", "train.weights '/no/such.pt' is not a file",
                 "train.channels_last must be one of auto, True, False"):
        assert part in msg
    with pytest.raises(config.ParamsError, match="fp16 is refused on the CPU"):
        config.load(None, ["train.precision=fp16", "train.device=cpu"])
    cfg = config.load(None, ["train.precision=fp32", "train.channels_last=false", "train.compile=false"])
    assert (cfg["train"]["precision"], cfg["train"]["channels_last"], cfg["train"]["compile"]) == ("fp32", False, False)
