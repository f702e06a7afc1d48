import pytest

from prunestudy import config


def test_defaults_are_the_seed_configuration():
    cfg = config.load("params/default.yaml")
    assert cfg["train"] == {"model": "seed_cnn", "epochs": 10, "batch_size": 32, "lr": 1e-4, "device": "auto"}
    assert cfg["prune"]["amount"] == 0.2 and cfg["prune"]["method"] == "l1_unstructured"
    assert cfg["data"]["image_size"] == 64 and cfg["data"]["root"] == "embedded"


def test_every_params_file_is_valid_and_sets_only_known_keys():
    for name in ("default", "smoke"):
        config.load(f"params/{name}.yaml")
    # the COCO file needs a root: an error that says how to give it, before any work
    with pytest.raises(config.ParamsError, match=r"data.root=/path/to/coco"):
        config.load("params/coco2017.yaml")
    assert config.load("params/coco2017.yaml", ["data.root=/x"])["data"]["root"] == "/x"


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
