"""Stage functions on a tiny embedded dataset: outputs, traceability, and clear errors."""

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from prunestudy import atomic, data, stages, synth

TINY = {"seed": 3, "train_images": 30, "val_images": 15, "image_size": 160}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rd = tmp_path_factory.mktemp("stages")
    root = synth.ensure(rd / "coco", **TINY)
    stages.run_data(rd, root=str(root), min_box=12, min_per_class=1)
    return rd


def test_generated_data_loads_in_pycocotools_and_crops_trace_to_annotations(run_dir):
    for split, coco_split in (("train", "train2017"), ("test", "val2017")):
        coco = COCO(str(run_dir / "coco" / "annotations" / f"instances_{coco_split}.json"))
        manifest = data.read_manifest(run_dir / "data", split)
        images, labels = data.load_split(run_dir / "data", split)
        assert len(manifest) == len(images) == len(labels) > 0
        classes = data.read_info(run_dir / "data")["classes"]
        for row in manifest.itertuples():
            ann = coco.anns[row.ann_id]
            assert ann["image_id"] == row.image_id and not ann["iscrowd"]
            assert coco.cats[ann["category_id"]]["name"] == row.category == classes[labels[row.index]]
            assert np.allclose(ann["bbox"], [row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h])
            assert min(ann["bbox"][2:]) >= 12


@pytest.mark.e2e
def test_train_prune_retrain_outputs(run_dir):
    log = []
    m = stages.run_train(run_dir, epochs=2, batch_size=16, lr=1e-3, seed=0, log=log.append)
    assert len(m["epochs"]) == 2 and len(log) == 2 and m["params_total"] == 4_293_194
    hist = atomic.read_json(run_dir / "train" / "history.json")
    n = data.read_info(run_dir / "data")["train_size"]
    assert len(hist["steps"]) == 2 * -(-n // 16)
    p = stages.run_prune(run_dir, amount=0.3)
    assert p["global_sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert p["dense_test_accuracy"] == pytest.approx(m["test_accuracy"])
    state = atomic.load_tensors(run_dir / "prune" / "model.pt")
    assert "fc1.weight_orig" not in state and (state["fc1.weight"] == 0).float().mean() == pytest.approx(0.3, abs=1e-4)
    r = stages.run_retrain(run_dir, epochs=1, batch_size=16, lr=1e-3, log=log.append)
    assert r["global_sparsity"] == pytest.approx(p["global_sparsity"])
    after = atomic.load_tensors(run_dir / "retrain" / "model.pt")
    pruned_zero = state["conv2.weight"] == 0
    assert (after["conv2.weight"][pruned_zero] == 0).all()
    assert not torch.equal(after["conv2.weight"], state["conv2.weight"])  # it did train
    res = stages.load_results(run_dir)
    assert {"data", "train", "prune", "retrain"} <= set(res)
    assert len(np.load(run_dir / "retrain" / "predictions.npy")) == res["data"]["test_size"]


def test_missing_upstream_stage_names_the_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"01_data.ipynb"):
        stages.run_train(tmp_path, epochs=1)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"01_data.ipynb"):
        stages.run_prune(tmp_path)


def test_checkpoints_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "model.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported"):
        atomic.load_tensors(tmp_path / "model.pt")


def test_atomic_json_leaves_no_partial_file(tmp_path):
    target = tmp_path / "m.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.e2e
def test_torchrun_training_writes_once_and_fine_tuning_reuses_its_speed(run_dir, tmp_path):
    """train.launcher=torchrun: two gloo processes train, rank 0 alone writes; the speed options the
    train stage ran with are recorded and reused by retraining."""
    import shutil

    rd = tmp_path / "ddp"
    shutil.copytree(run_dir / "data", rd / "data")
    log = []
    m = stages.run_train(rd, epochs=1, batch_size=16, lr=1e-3, seed=0, launcher="torchrun", nproc_per_node=2,
                         precision="fp32", channels_last=True, compile=False, fused=False, log=log.append)
    assert m["world_size"] == 2 and m["params"]["launcher"] == "torchrun"
    assert m["speed"]["precision"] == "fp32" and m["speed"]["channels_last"] is True and m["speed"]["fused"] is False
    assert sorted(p.name for p in (rd / "train").iterdir()) == ["history.json", "metrics.json", "model.pt",
                                                                "predictions.npy", "stage.json"]
    assert any("epoch 1/1" in line for line in log)  # torchrun's output streamed back
    stages.run_prune(rd, amount=0.3, seed=0)
    # retraining runs as training did, under torchrun: the pruned model and the dense control are
    # fine-tuned by both ranks; rank 0 alone measures and writes
    log.clear()
    r = stages.run_retrain(rd, epochs=1, batch_size=16, lr=1e-3, seed=0, control=True, log=log.append)
    assert r["speed"] == m["speed"] and not (rd / "retrain" / "checkpoint.pt").exists()
    assert r["launcher"] == "torchrun" and r["world_size"] == 2
    for label in ("retrain", "control"):
        assert any(f"[{label}] rank 1/2:" in line for line in log), label   # rank 1 trained too
    plain = stages.run_retrain(rd, epochs=1, batch_size=16, lr=1e-3, seed=0, control=True, launcher="none",
                               out_dir=tmp_path / "plain", log=lambda s: None)
    assert plain["world_size"] == 1
    def outputs(folder):   # the plain run's claim on its control (a lock file) is not an output
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.endswith(".claim"))
    assert outputs(rd / "retrain") == outputs(tmp_path / "plain")
    # the seed CNN's dropout draws differ per rank (seed + rank), so 2 ranks do not match 1 process to
    # float precision here (tests/test_distributed.py proves that for fit on a model without dropout);
    # the same masks are held, and the losses agree as two runs with other dropout draws do
    a, b = (atomic.load_tensors(d / "model.pt") for d in (rd / "retrain", tmp_path / "plain"))
    for k in b:
        assert torch.equal(a[k] == 0, b[k] == 0), k
    assert r["test_loss"] == pytest.approx(plain["test_loss"], rel=0.05)
    control = atomic.read_json(rd / "retrain" / "control" / "metrics.json")
    assert control["test_loss"] == pytest.approx(atomic.read_json(tmp_path / "plain" / "control" / "metrics.json")
                                                 ["test_loss"], rel=0.05)
