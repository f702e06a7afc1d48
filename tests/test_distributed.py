import importlib
import json
import re
import sys
import textwrap

import pytest
import torch

from prunestudy import distributed

# A stage-like function run by the workers: learnable synthetic data (101 samples: the last
# global batch of 5 splits 3 + 2 over two ranks), a small CNN without dropout or batch norm,
# artifacts written only on the main process. Every artifact write (fit's checkpoint included)
# is recorded with the rank that made it, in writes.log.
JOB = textwrap.dedent("""
    import os
    import torch
    from torch import nn
    from prunestudy import atomic, train

    _save_tensors, _write_json = atomic.save_tensors, atomic.write_json

    def _record(fn):
        def wrapped(path, obj):
            with open(os.environ["WRITES_LOG"], "a") as f:
                f.write(f"{os.environ.get('RANK', 'plain')} {os.path.basename(path)}\\n")
            return fn(path, obj)
        return wrapped

    atomic.save_tensors, atomic.write_json = _record(_save_tensors), _record(_write_json)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.max_pool2d(torch.relu(self.conv(x)), 2), 1))

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (n,), generator=g)
        x = (y[:, None, None, None] * 70 + torch.randint(0, 100, (n, 3, 16, 16), generator=g)).to(torch.uint8)
        return x, y

    def job(out_dir, epochs=2, batch_size=16, lr=3e-3, seed=0):
        torch.manual_seed(seed)
        m = Net()
        h = train.fit(m, data(101, 1), data(40, 2), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      checkpoint=os.path.join(out_dir, "ckpt.pt"))
        if train.is_main_process():
            atomic.save_tensors(os.path.join(out_dir, "model.pt"), m.state_dict())
            atomic.write_json(os.path.join(out_dir, "history.json"), h)
        return {"samples_per_rank": h["samples_per_rank"], "world_size": h["world_size"]}

    def crash(rank=1):
        import torch.distributed as dist
        for i in range(3):
            print(f"rank {dist.get_rank()} line {i}", flush=True)
        if dist.get_rank() == rank:
            print(f"rank {rank} about to abort", flush=True)
            os.abort()
        dist.barrier()

    def teardown_probe(out_dir):
        import atexit
        import torch.distributed as dist
        path = os.path.join(out_dir, f"teardown-{dist.get_rank()}")
        atexit.register(lambda: open(path, "w").close())
        return "done"
""")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def job_module(tmp_path, monkeypatch):
    from prunestudy import atomic

    (tmp_path / "ddp_job.py").write_text(JOB)
    monkeypatch.setenv("WRITES_LOG", str(tmp_path / "writes.log"))
    monkeypatch.syspath_prepend(str(tmp_path))
    # importing the job here wraps atomic's writers in this process too: undo that afterwards
    monkeypatch.setattr(atomic, "save_tensors", atomic.save_tensors)
    monkeypatch.setattr(atomic, "write_json", atomic.write_json)
    sys.modules.pop("ddp_job", None)
    yield tmp_path
    sys.modules.pop("ddp_job", None)


@pytest.mark.e2e
def test_two_cpu_processes_match_a_single_process_run(job_module, tmp_path):
    """2 ranks (gloo) vs 1 process, same global batch of 16, 2 epochs.

    Each sample gets the same permutation slot and augmentation draw in both runs, and the
    loss is scaled so that DDP's gradient average is the global batch mean's gradient: the runs
    differ only in float summation order (per-rank convolutions and the gradient all-reduce),
    ~1e-7 per step here (measured: weights differ by <= 3e-8 after 14 steps; a wrongly scaled loss on the
    uneven last batch gives 4e-4). Tolerance: 1e-5
    absolute on weights (values ~0.1) and 1e-5 relative on losses and accuracies.
    """
    (tmp_path / "ddp").mkdir()
    (tmp_path / "plain").mkdir()
    lines = []
    result = distributed.launch("ddp_job:job", {"out_dir": str(tmp_path / "ddp")}, nproc_per_node=2,
                                log=lines.append, env={"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"})
    ddp_writes = (tmp_path / "writes.log").read_text().split()
    (tmp_path / "writes.log").unlink()
    torch.set_num_threads(1)
    importlib.import_module("ddp_job").job(str(tmp_path / "plain"))

    # training happened on both ranks, on their shares of every global batch (51 + 50 per epoch)
    assert result == {"samples_per_rank": [102, 100], "world_size": 2}
    assert any("rank 0/2: 102 training samples seen" in s for s in lines)
    assert any("rank 1/2: 100 training samples seen" in s for s in lines)
    assert sum("[train] epoch 2/2" in s for s in lines) == 1  # epochs are logged once, by rank 0
    # one set of artifacts, all written by rank 0: the checkpoint per epoch, the job's results,
    # then the worker's copy of the return value for launch
    assert ddp_writes == ["0", "ckpt.pt", "0", "ckpt.pt", "0", "model.pt", "0", "history.json", "0", "result.json"]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["ckpt.pt", "history.json", "model.pt"]

    a = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("ddp", "plain"))
    assert ha["steps"] == pytest.approx(hb["steps"], rel=1e-5)
    for ra, rb in zip(ha["epochs"], hb["epochs"]):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    assert hb["epochs"][-1]["test_accuracy"] > 0.8  # it learned


@pytest.mark.e2e
def test_launch_failure_reports_the_last_lines(job_module):
    with pytest.raises(distributed.LaunchError, match=r"(?s)exit code.*cannot find stage function 'ddp_job:nope'"):
        distributed.launch("ddp_job:nope", {}, nproc_per_node=1, log=lambda s: None,
                           env={"PYTHONPATH": str(job_module)})


@pytest.mark.e2e
def test_a_crashed_rank_is_named_with_its_signal_its_last_lines_and_its_stack(job_module):
    """A rank that dies of a signal prints no traceback; torchrun's report of it (~40 lines of its
    own traceback and box) used to fill the message's last lines and hide what the rank printed."""
    with pytest.raises(distributed.LaunchError) as e:
        distributed.launch("ddp_job:crash", {}, nproc_per_node=2, log=lambda s: None,
                           env={"PYTHONPATH": str(job_module), "OMP_NUM_THREADS": "1"})
    msg = str(e.value)
    assert re.search(r"first failure: rank 1 \(local_rank: 1\), exitcode -6 \(pid: \d+\) \(SIGABRT\);", msg), msg
    before = msg.split("before torchrun's report:\n", 1)[1]
    assert "rank 1 about to abort" in before and "Fatal Python error: Aborted" in before, msg
    assert re.search(r"ddp_job.py\", line \d+ in crash", before), msg  # the fault handler's stack
    assert "ChildFailedError" not in before


@pytest.mark.e2e
def test_a_finished_rank_skips_the_interpreters_teardown(job_module, tmp_path):
    """Under load a gloo rank that had finished its stage could abort in the interpreter's
    teardown ("terminate called without an active exception", 2 of 30 launches while two sweep
    tests ran; 0 of 60 since) and torchrun failed the run: a finished worker exits at once."""
    assert distributed.launch("ddp_job:teardown_probe", {"out_dir": str(tmp_path)}, nproc_per_node=2,
                              log=lambda s: None, env={"PYTHONPATH": str(job_module),
                                                       "OMP_NUM_THREADS": "1"}) == "done"
    assert not list(tmp_path.glob("teardown-*"))  # no atexit handler ran: no teardown


def test_failure_text_without_torchruns_report_keeps_the_last_lines():
    lines = [f"line {i}" for i in range(100)]
    assert distributed.failure_text(lines, tail=3) == "; last lines:\nline 97\nline 98\nline 99"


def test_command_single_and_multi_node():
    one = distributed.command("a.json", 2)
    assert one[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert one[-3:] == ["-m", "prunestudy.distributed", "a.json"] and "2" in one
    multi = distributed.command("a.json", 8, nnodes=2, rdzv_endpoint="node0:29400")
    assert "--standalone" not in multi
    assert multi[multi.index("--rdzv-endpoint") + 1] == "node0:29400" and multi[multi.index("--nnodes") + 1] == "2"
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        distributed.command("a.json", 8, nnodes=2)


def test_resolve_stage():
    from prunestudy import stages

    assert distributed.resolve_stage("run_train") is stages.run_train
    assert distributed.resolve_stage("prunestudy.train:fit").__name__ == "fit"
    with pytest.raises(distributed.LaunchError, match="cannot find stage function"):
        distributed.resolve_stage("no_such_stage")
