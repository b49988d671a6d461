"""ThroughputMonitor: rates against hand counts on a fake clock, FLOPs against
FlopCounterMode's own count, the keys in History / CSV / TensorBoard / the report, and no
value read from the device per batch."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

import torcheras
from torcheras.callbacks import (
    Callback,
    CallbackList,
    CSVLogger,
    TensorBoard,
    ThroughputMonitor,
    throughput_monitor,
)
from torcheras.report import write_report

RATES = ("samples_per_second", "batches_per_second", "flops_per_batch", "flops_per_second", "mfu")


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    """Each training batch takes ``seconds`` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, batch, logs=None):
        self.clock.now += self.seconds


class BatchLogsSeen(Callback):
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append({k: logs[k] for k in logs if k in RATES})


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throughput_monitor, "clock", fake)
    return fake


def first_step_flops(x: torch.Tensor, y: torch.Tensor) -> int:
    """FlopCounterMode's own count of one forward and backward of conftest's MLP."""
    net = make_model().module
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("monitor_first", [True, False])
def test_rates_flops_and_mfu_match_a_hand_count(blobs, clock, monitor_first):
    """192 training samples in batches of 50, 50, 50, 42; each batch takes 0.5 s."""
    x, y = blobs
    monitor = ThroughputMonitor(peak_flops=1e6, log_every_n_steps=2)
    seen = BatchLogsSeen()
    cbs = [monitor, Tick(clock, 0.5), seen]
    history = make_model().fit(
        x, y, epochs=2, batch_size=50, validation_split=0.2, verbose=0,
        callbacks=cbs if monitor_first else cbs[::-1],
    )  # fmt: skip
    # Linear(8, 16) and Linear(16, 3) on 50 samples: forward 2*50*(8*16 + 16*3); backward the
    # same twice for the second layer (input and weight gradients), once for the first
    # (its input needs no gradient); Adam's elementwise work counts nothing
    hand = 2 * 50 * (8 * 16 + 16 * 3) + 2 * 2 * 50 * 16 * 3 + 2 * 50 * 8 * 16
    assert (
        monitor.flops_per_batch
        == hand
        == first_step_flops(torch.tensor(x[:50]), torch.tensor(y[:50]))
    )
    h = history.history
    tol = {"rel": 1e-6}  # float32 inputs, float64 sums of exact binary fractions
    assert h["samples_per_second"] == pytest.approx([192 / 2.0] * 2, **tol)
    assert h["batches_per_second"] == pytest.approx([4 / 2.0] * 2, **tol)
    assert h["flops_per_batch"] == [hand, hand]
    per_sample = hand / 50
    assert h["flops_per_second"] == pytest.approx([per_sample * 96] * 2, **tol)
    assert h["mfu"] == pytest.approx([per_sample * 96 / 1e6] * 2, **tol)
    assert "tokens_per_second" not in h and "peak_memory_gib" not in h  # no tokens, no CUDA
    # batch logs: after batches 0 and 1 (100 samples in 1 s) the values appear, whatever the
    # callbacks' order, and stay a mean over the epoch so far until the next 2 batches
    assert [s.get("samples_per_second") for s in seen.seen[:4]] == pytest.approx(
        [None, None, 100, 100]
    )
    assert seen.seen[2]["batches_per_second"] == pytest.approx(2.0)
    assert seen.seen[2]["flops_per_second"] == pytest.approx(per_sample * 100)


def test_token_inputs_count_n_times_t_tokens_and_tokens_fn_counts_its_own(clock):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (64, 6), generator=g)  # token ids: 64 sequences of 6
    x[::2, 4:] = 0  # padding at the end of every other sequence
    y = torch.randint(0, 3, (64,), generator=g)

    def fit(monitor):
        net = torch.nn.Sequential(
            torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(24, 3)
        )
        model = torcheras.Model(net)
        model.compile("sgd", "sparse_categorical_crossentropy", device="cpu")
        return model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False,
                         callbacks=[monitor, Tick(clock, 0.25)]).history  # fmt: skip

    plain = fit(ThroughputMonitor())
    assert plain["tokens_per_second"] == pytest.approx([64 * 6 / 1.0])
    assert plain["samples_per_second"] == pytest.approx([64 / 1.0])
    real = int((x != 0).sum())
    counted = fit(ThroughputMonitor(tokens_fn=lambda batch: (batch[0] != 0).sum()))
    assert counted["tokens_per_second"] == pytest.approx([real / 1.0])
    # FLOPs scale with tokens: the first batch's FLOPs per token times the tokens per second
    first = int((x[:16] != 0).sum())
    flops = counted["flops_per_batch"][0]
    assert counted["flops_per_second"] == pytest.approx([flops / first * real / 1.0])


def test_keys_reach_history_csv_tensorboard_and_the_report(tmp_path, blobs):
    x, y = blobs
    run = tmp_path / "run"
    history = make_model().fit(
        x, y, epochs=2, batch_size=40, verbose=0,
        callbacks=[CSVLogger(run / "log.csv"), TensorBoard(run / "tb"),
                   ThroughputMonitor(peak_flops=1e9)],  # last: its keys still reach the others
    )  # fmt: skip
    h = history.history
    for key in RATES:
        assert len(h[key]) == 2 and all(v > 0 for v in h[key]), key
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in RATES:
        assert [float(r[key]) for r in rows] == pytest.approx(h[key], rel=1e-6), key
    acc = EventAccumulator(str(run / "tb" / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in RATES:
        values = [e.value for e in acc.Scalars(f"epoch_{key}")]
        assert values == pytest.approx(h[key], rel=1e-6), key  # float32 in the event file
    page = write_report(run).read_text()
    assert all(key in page for key in RATES)


class SyncCounter(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (a device sync on CUDA)."""

    READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_steps", [None, 3])
def test_no_value_is_read_from_the_device_per_batch(blobs, n_steps):
    """The host reads of a fit are the same with the monitor as without it (the loop's own,
    once per epoch), and the monitor asks for no batch logs."""
    x, y = blobs

    def reads(callbacks):
        model = make_model()
        with SyncCounter() as counter:
            model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=callbacks)  # 60 batches
        return counter.reads

    baseline = reads([])
    assert baseline > 0  # the loop's reads at the epochs' ends are seen
    assert reads([ThroughputMonitor(peak_flops=1e9, log_every_n_steps=n_steps)]) == baseline
    assert not CallbackList([ThroughputMonitor()]).needs("on_train_batch_end")


def test_an_error_in_the_counted_step_leaves_no_counting_mode_behind(blobs):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    class Crash(Callback):
        def on_after_backward(self, batch):
            raise RuntimeError("boom")

    x, y = blobs
    with pytest.raises(RuntimeError, match="boom"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[ThroughputMonitor(), Crash()])
    assert _get_current_dispatch_mode() is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("Tesla T4", 65e12),
        ("Tesla V100-PCIE-32GB", 112e12),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_known_gpu_peaks(name, peak):
    assert throughput_monitor.peak_flops_of(name) == peak


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"peak_flops": 0}, "`peak_flops` must be a positive number"),
        ({"peak_flops": "989T"}, "`peak_flops` must be a positive number"),
        ({"log_every_n_steps": 0}, "`log_every_n_steps` must be a positive integer"),
        ({"log_every_n_steps": 2.5}, "`log_every_n_steps` must be a positive integer"),
        ({"tokens_fn": 3}, "`tokens_fn` must be a function"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThroughputMonitor(**kwargs)


def test_outside_fit_it_says_so():
    monitor = ThroughputMonitor()
    CallbackList([monitor], model=torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="inside torcheras Model.fit only"):
        monitor.on_train_begin()


def test_a_second_fit_of_the_same_model_does_not_count_again(blobs, monkeypatch):
    x, y = blobs
    model, monitor = make_model(), ThroughputMonitor()
    model.fit(x, y, epochs=1, batch_size=40, verbose=0, callbacks=[monitor])
    counted = monitor.flops_per_batch
    monkeypatch.setattr(ThroughputMonitor, "_start_counting", lambda self: pytest.fail("again"))
    history = model.fit(x, y, epochs=1, batch_size=40, verbose=0, callbacks=[monitor])
    assert history.history["flops_per_batch"] == [counted]


DDP_SCRIPT = """
import json, os, sys
import torch
import torcheras
from torcheras.callbacks import Callback, ThroughputMonitor, throughput_monitor

now = [0.0]
throughput_monitor.clock = lambda: now[0]

class Tick(Callback):  # a batch takes 0.5 s on every rank
    def on_train_batch_end(self, batch, logs=None):
        now[0] += 0.5

torch.manual_seed(0)
model = torcheras.Model(torch.nn.Linear(5, 2))
model.compile("sgd", "mse", device="cpu")
monitor = ThroughputMonitor(peak_flops=1e6)
history = model.fit(torch.randn(80, 5), torch.randn(80, 2), batch_size=8, verbose=0,
                    callbacks=[monitor, Tick()])
with open(os.path.join(sys.argv[1], f"h{os.environ['RANK']}.json"), "w") as f:
    json.dump({"history": history.history, "counted": monitor.flops_per_batch}, f)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_under_torchrun_the_rates_are_those_of_every_process_together(tmp_path):
    """2 processes, 10 batches of 8 (4 on each), 0.5 s a batch: 80 samples in 5 s."""
    import json
    from pathlib import Path

    from conftest import launch_script

    script = tmp_path / "script.py"
    script.write_text(DDP_SCRIPT)
    src = str(Path(__file__).parents[2] / "src")
    launch_script(script, tmp_path, ranks=2, timeout=180, env={"PYTHONPATH": src})
    runs = [json.loads((tmp_path / f"h{r}.json").read_text()) for r in (0, 1)]
    assert runs[0]["history"] == runs[1]["history"]
    h, per_process = runs[0]["history"], runs[0]["counted"]
    assert per_process == 2 * 4 * 5 * 2 * 2  # Linear(5, 2) on 4 samples: forward + weight grad
    assert h["samples_per_second"] == pytest.approx([80 / 5.0])
    assert h["batches_per_second"] == pytest.approx([10 / 5.0])
    assert h["flops_per_batch"] == [2 * per_process]  # a batch of both processes
    assert h["flops_per_second"] == pytest.approx([2 * per_process * 2.0])
    assert h["mfu"] == pytest.approx([per_process * 2.0 / 1e6])  # per device
