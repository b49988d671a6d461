"""Shared fixtures: seeded tiny data and models, and a driver for scripted metric sequences."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# One thread a process, here and in every process a test starts (examples, torchrun ranks,
# killed and resumed runs): with the 2 workers of `make test` on 2 cores, torch's default of
# one thread a core oversubscribes the machine, and small ops spin (the demo took 6x longer).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("KERAS_BACKEND", "torch")  # the Keras reference numbers run on torch

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import torcheras  # noqa: E402
from torcheras import stepping  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """pytest-randomly shuffles the order; it must not reseed numpy and random to the session's
    seed: each test seeds every RNG itself (below), so its data never depends on the order."""
    if hasattr(config.option, "randomly_reset_seed"):
        config.option.randomly_reset_seed = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--dist loadgroup`` (pyproject.toml) under pytest 9: pytest-xdist 3.8's workers name
    the tests of an ``xdist_group`` by a suffix to their node id (``...@group``, which sends
    the group to one worker), through an attribute pytest 9 no longer reads; without it every
    test is scheduled alone, and a module fixture runs once per worker. Set the suffix where
    pytest 9 keeps the node id (nothing to do where xdist's own suffix took)."""
    if not getattr(config.option, "loadgroup", False):  # set on pytest-xdist's workers
        return
    try:  # pytest 9's private node-id type; elsewhere (pytest 8) xdist's own suffix works
        from _pytest.nodeid import NodeId
    except ImportError:
        return
    for item in items:
        marks = item.iter_markers("xdist_group")
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        if names and "@" not in item.nodeid.rpartition("]")[2]:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(names))}")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG states, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture
def device() -> str:
    """The accelerator where one is present (CUDA), else the CPU: tests that take it run on
    the GPU when the suite runs on a GPU machine."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """A separable 3-class problem: 240 samples, 8 features (float32 / int64 numpy)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(3, 8))
    y = rng.integers(0, 3, size=240)
    x = centers[y] + rng.normal(0, 1, size=(240, 8))
    return x.astype(np.float32), y.astype(np.int64)


def make_model(
    n_in: int = 8,
    n_out: int = 3,
    metrics: Sequence[Any] | None = ("accuracy",),
    loss: Any = "sparse_categorical_crossentropy",
    optimizer: Any = "adam",
    **compile_kwargs: Any,
) -> torcheras.Model:
    net = torch.nn.Sequential(
        torch.nn.Linear(n_in, 16), torch.nn.ReLU(), torch.nn.Linear(16, n_out)
    )
    model = torcheras.Model(net)
    if isinstance(optimizer, str):
        compile_kwargs.setdefault("learning_rate", 0.02)
    compile_kwargs.setdefault("device", "cpu")
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics or []), **compile_kwargs)
    return model


@pytest.fixture
def model() -> torcheras.Model:
    return make_model()


@pytest.fixture
def train_step_calls(monkeypatch) -> list[tuple[int, int]]:
    """The (epoch, batch) of every batch that ran ``Model.train_step`` itself, not a loop's
    inlined body of it (``Stepping.zero_grad`` is called by ``train_step`` alone)."""
    seen: list[tuple[int, int]] = []
    default = stepping.Stepping.zero_grad

    def counted(self: Any) -> None:
        seen.append((self.loop.epoch, self.loop.batch))
        default(self)

    monkeypatch.setattr(stepping.Stepping, "zero_grad", counted)
    return seen


def drive(
    callback: Any,
    values: Sequence[float],
    monitor: str = "val_loss",
    model: Any = None,
    extra: dict[str, float] | None = None,
) -> list[int]:
    """Run scripted epoch ends through ``callback`` as a hand-written loop would.

    Returns the epochs that ran (training stops when the callback sets stop_training).
    """
    from torcheras.callbacks import CallbackList

    model = model if model is not None else make_model()
    callbacks = CallbackList([callback], model=model, epochs=len(values), steps=1, verbose=0)
    model.stop_training = False
    ran = []
    callbacks.on_train_begin()
    logs: dict[str, float] = {}
    for epoch, value in enumerate(values):
        callbacks.on_epoch_begin(epoch)
        logs = {"loss": 1.0, monitor: value, **(extra or {})}
        callbacks.on_epoch_end(epoch, logs)
        ran.append(epoch)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)
    return ran


def files_in(folder: str | os.PathLike[str]) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture(scope="session")
def keras() -> Any:
    """Keras 3 on the torch backend (the ``bench`` extra), the reference Keras numbers come
    from; the test is skipped where it is not installed or runs another backend."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    module = pytest.importorskip("keras")
    if module.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    return module


def dense_pairs(keras: Any, theirs: Any, linears: list[Any]) -> list[tuple[Any, Any, Any]]:
    """(linear, kernel, bias) for each Keras Dense layer of ``theirs`` and its ``nn.Linear``:
    Keras's weights as torch tensors, the kernel transposed to torch's (out, in)."""
    pairs = []
    for layer, linear in zip([each for each in theirs.layers if each.weights], linears):
        kernel, bias = (torch.as_tensor(keras.ops.convert_to_numpy(v)) for v in layer.weights)
        pairs.append((linear, kernel.T, bias))
    return pairs


def copy_keras_weights(keras: Any, theirs: Any, linears: list[Any]) -> None:
    """Start the torch layers from the Keras model's initial weights (same numbers)."""
    with torch.no_grad():
        for linear, kernel, bias in dense_pairs(keras, theirs, linears):
            linear.weight.copy_(kernel)
            linear.bias.copy_(bias)


def assert_same_weights(keras: Any, theirs: Any, linears: list[Any], atol: float) -> None:
    for linear, kernel, bias in dense_pairs(keras, theirs, linears):
        torch.testing.assert_close(linear.weight.detach(), kernel, rtol=0, atol=atol)
        torch.testing.assert_close(linear.bias.detach(), bias, rtol=0, atol=atol)


def guide_snippet(page: str, section: str) -> str:
    """The first ``python`` block of a ``## section`` of ``docs/guide/<page>``."""
    import re

    text = (Path(__file__).parent.parent / "docs" / "guide" / page).read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def launch_script(
    script: Any,
    *args: Any,
    ranks: int = 1,
    check: bool = True,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> Any:
    """Run a test script alone (``ranks=1``) or under torchrun's module on the CPU with
    ``ranks`` processes, one thread each and a short rendezvous timeout, under ``timeout`` so
    that a hang fails the test; ``args`` are its command line (``"::"`` between the arguments
    of several runs in one process: ``run_to_end.py``), ``env`` adds to the environment.
    With ``check``, a non-zero exit fails the test with stderr's tail, except the one abort
    torch's gloo threads cause at interpreter exit after every rank's script has returned
    (``run_to_end.py``): a warning names it, and the test goes on to check what the run wrote."""
    import subprocess
    import sys
    import warnings

    from run_to_end import FINISHED

    env = {**os.environ, "TORCHERAS_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1", **(env or {})}  # fmt: skip
    runner = str(Path(__file__).parent / "run_to_end.py")
    command = [sys.executable, runner, str(script)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", runner, str(script)]  # fmt: skip
    done = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    finished = done.stdout.count(FINISHED)
    # the script's output alone (another rank's unbuffered print may have split the line)
    done.stdout = done.stdout.replace(FINISHED + "\n", "").replace(FINISHED, "")
    if check and done.returncode != 0:
        aborted_at_exit = (
            ranks > 1
            and finished == ranks
            and "terminate called without an active exception" in done.stderr
        )
        assert aborted_at_exit, done.stderr[-3000:]
        warnings.warn(
            f"{Path(str(script)).name}: every rank finished, then torch's gloo threads aborted "
            "a process at interpreter exit (pytorch/pytorch#179291)",
            RuntimeWarning,
            stacklevel=2,
        )
    return done
