"""A training script run under torchrun (2 processes, gloo) and alone, by test_distributed.py.

    python ddp_script.py OUT [--case same|early_stop|nan]
    torchrun --standalone --nproc_per_node=2 ddp_script.py OUT [--case ...]
    torchrun --nnodes=2 --rdzv-backend=c10d ... ddp_script.py OUT  (two agents: test_multinode.py)

Each rank saves what it ended with (weights, History) under OUT/rank<r>/ with torch.save, so
the test can compare ranks; torcheras itself writes files on rank 0 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--case", default="same")
parser.add_argument("--device", default="cpu", help="cuda: NCCL, one GPU per rank")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--loader", action="store_true", help="DataLoaders instead of arrays")
parser.add_argument("--torchmetrics", action="store_true")
parser.add_argument("--keras-metrics", action="store_true", help="counts summed over ranks")
parser.add_argument("--verbose", type=int, default=0)
parser.add_argument("--iterable", action="store_true", help="batches of unknown number")
parser.add_argument("--no-shuffle", action="store_true")
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--kill-at", type=int, default=-1, help="kill the whole job at this step")
parser.add_argument("--validation-interval", type=int, default=None)
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--backup", action="store_true", help="BackupAndRestore in any case")
parser.add_argument("--kill-node-at", type=int, default=-1, help="kill the last node's agent")
args = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))
torch.manual_seed(0)
np.random.seed(0)
torch.set_num_threads(1)

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 6)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
xv, yv = x[:64].copy(), y[:64].copy()
if args.case == "nan" and rank == 1:
    x[160:] = np.nan  # this rank's data goes bad in the first epoch
if args.case == "shard" and rank == 1:
    x, y = x[:200], y[:200]  # a per-rank shard loaded by mistake: 256 samples vs 200
if args.case == "early_stop" and rank == 1:
    yv = (yv + 1) % 3  # this rank's validation labels are all wrong: its own val_loss climbs

net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
model = torcheras.Model(net)
metrics: list = ["accuracy"]
if args.torchmetrics:  # synced by torchmetrics itself at the end of each epoch
    import torchmetrics

    metrics = [torchmetrics.Accuracy(task="multiclass", num_classes=3)]
    if rank == 0:  # a batch value read on one rank only (as a progress bar does) must not sync
        batch_accuracy: list[float] = []
        read_on_rank_0 = cb.LambdaCallback(
            on_train_batch_end=lambda batch, logs: batch_accuracy.append(
                float(logs["multiclass_accuracy"])
            )
        )
if args.keras_metrics:  # states of counts: the global counts, not a mean of rank results
    from torcheras import metrics as tm

    metrics = ["precision", "auc", tm.F1Score(average="macro"), tm.MeanIoU(3, sparse_y_pred=False)]
model.compile(torch.optim.SGD(net.parameters(), lr=0.1), "sparse_categorical_crossentropy",
              metrics=metrics, device=args.device,
              gradient_accumulation_steps=args.accumulate)  # fmt: skip
out = os.path.join(args.out, f"rank{rank}")
callbacks = [
    cb.CSVLogger(os.path.join(args.out, "log.csv")),
    cb.ModelCheckpoint(os.path.join(out, "best.pt"), save_best_only=True),
]
if args.case == "early_stop":
    callbacks.append(cb.EarlyStopping(monitor="val_loss", patience=1, min_delta=0.01))
if args.case == "nan":
    callbacks.append(cb.TerminateOnNaN())
if args.torchmetrics and rank == 0:
    callbacks.append(read_on_rank_0)
trained = []  # the batches this process really trained (a resumed run: only what was left)
callbacks.append(cb.LambdaCallback(on_train_batch_end=lambda batch, logs: trained.append(batch)))
if args.case in ("backup", "sigterm") or args.backup:
    callbacks.append(cb.BackupAndRestore(os.path.join(args.out, "backup"), save_freq=3))
if args.kill_at >= 0 and rank == 0:  # kill -9 of the whole job: every worker and torchrun
    import signal

    from torcheras import checkpoint

    def kill_job(batch, logs):
        if model.loop.global_step == args.kill_at:
            checkpoint.wait_for_writes()
            parent = os.getppid()
            for pid in os.listdir("/proc"):
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        with open(f"/proc/{pid}/stat") as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                                os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError, IndexError):
                        pass
            os.kill(parent, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    callbacks.append(cb.LambdaCallback(on_train_batch_end=kill_job))
if args.kill_node_at >= 0:  # a node lost: kill -9 of its torchrun agent and its processes
    import signal

    from torcheras import checkpoint

    killed = os.path.join(args.out, "node-killed")  # once: the restarted job goes on
    last_node = (
        int(os.environ["GROUP_RANK"])
        == int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]) - 1
    )

    def kill_node(batch, logs):
        if model.loop.global_step == args.kill_node_at and not os.path.exists(killed):
            checkpoint.wait_for_writes()
            torch.distributed.barrier()  # the backup before this step has landed everywhere
            if last_node and int(os.environ["LOCAL_RANK"]) == 0:
                open(killed, "w").close()
                agent = os.getppid()
                for pid in os.listdir("/proc"):  # this node's other workers, then its agent
                    if pid.isdigit() and int(pid) != os.getpid():
                        try:
                            with open(f"/proc/{pid}/stat") as f:
                                if int(f.read().rsplit(")", 1)[1].split()[1]) == agent:
                                    os.kill(int(pid), signal.SIGKILL)
                        except (OSError, ValueError, IndexError):
                            pass
                os.kill(agent, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks.append(cb.LambdaCallback(on_train_batch_end=kill_node))
if args.case == "sigterm" and rank == 1:  # a preemption notice reaching this rank only
    import signal

    def preempt(batch, logs):
        if model.loop.global_step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    callbacks.append(cb.LambdaCallback(on_train_batch_end=preempt))
if args.case == "kill" and rank == 1:  # this rank dies in the middle of the second epoch
    import signal

    def die(batch, logs):
        if model.loop.epoch == 1 and batch == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    callbacks.append(cb.LambdaCallback(on_train_batch_end=die))
reductions = []  # the gradient all-reduces DDP made (one bucket for this small model)


def count_reductions(logs):
    if model._ddp is not None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state, bucket):
            reductions.append(model.loop.global_step)
            return default_hooks.allreduce_hook(state, bucket)

        model._ddp.register_comm_hook(None, hook)


callbacks.append(cb.LambdaCallback(on_train_begin=count_reductions))
seen: dict[int, list[int]] = {}  # epoch -> the training samples this rank loaded


class Recorded(torch.utils.data.Dataset):
    def __init__(self, x, y, record):
        self.x, self.y, self.record = torch.as_tensor(x), torch.as_tensor(y), record

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.record:
            seen.setdefault(model.loop.epoch, []).append(int(i))
        return self.x[i], self.y[i]


shuffle = not args.no_shuffle
if args.loader:
    from torch.utils.data import DataLoader

    train = {"x": DataLoader(Recorded(x, y, True), batch_size=args.batch_size, shuffle=shuffle)}
    validation = DataLoader(Recorded(xv, yv, False), batch_size=args.batch_size)
elif args.iterable:  # no len(): the loop learns where the epoch ends when it ends

    class Batches:
        def __iter__(self):
            for i in range(0, len(x), args.batch_size):
                part = slice(i, i + args.batch_size)
                yield torch.as_tensor(x[part]), torch.as_tensor(y[part])

    train = {"x": Batches()}
    validation = (xv, yv)
else:
    train = {"x": x, "y": y, "batch_size": args.batch_size, "shuffle": shuffle}
    validation = (xv, yv)
history = model.fit(
    **train, epochs=args.epochs, verbose=args.verbose, validation_data=validation,
    callbacks=callbacks, validation_interval=args.validation_interval,
)  # fmt: skip
os.makedirs(os.path.join(args.out, f"result{rank}"), exist_ok=True)
torch.save(
    {
        "weights": model.state_dict(),
        "predict": torch.as_tensor(
            model.predict(torch.utils.data.DataLoader(torch.as_tensor(x[:50]), batch_size=16))
            if args.loader
            else model.predict(x[:50], batch_size=16)
        ),
    },
    os.path.join(args.out, f"result{rank}", "final.pt"),
)
evaluation = {"x": validation} if args.loader else {"x": xv, "y": yv}
summary = {
    "history": history.history,
    "epoch": history.epoch,
    "trained": len(trained),
    "seen": seen,
    "reductions": len(reductions),
    "evaluate": model.evaluate(**evaluation, verbose=0, return_dict=True),
    "validation_history": history.validation_history,
    "global_step": model.loop.global_step,
    "stop_reason": history.stop_reason,
}
with open(os.path.join(args.out, f"result{rank}", "history.json"), "w") as f:
    json.dump(summary, f)
