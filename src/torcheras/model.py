"""``torcheras.Model``: Keras's compile / fit / evaluate / predict for any ``nn.Module``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from torcheras import checkpoint, data, distributed, loops, losses, optimizers, stepping, tensors
from torcheras import metrics as metrics_lib
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.callback_list import CallbackList
from torcheras.callbacks.history import History
from torcheras.ema import ExponentialMovingAverage
from torcheras.freezing import keep_frozen_in_eval
from torcheras.logs import LogCollector
from torcheras.loop_state import LoopState
from torcheras.precision import Precision
from torcheras.state import (
    is_sharded,
    model_file_state,
    own_weights,
    read_model_file,
    restore_model_state,
)
from torcheras.stepping import CompiledStep, Stepping

__all__ = ["Model", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _call(fn: Callable[..., Any], x: Any) -> Any:
    if type(x) is Tensor:  # the common case first: no ABC check per batch
        return fn(x)
    if isinstance(x, Mapping):
        return fn(**x)
    if isinstance(x, (tuple, list)):
        return fn(*x)
    return fn(x)


def _check_verbose(verbose: Any) -> None:
    if verbose not in ("auto", 0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2; got {verbose!r}.")


class Model(nn.Module):
    """A ``torch.nn.Module`` with Keras's training API.

    Wrap any module, or subclass ``Model`` and define layers in ``__init__`` and a ``forward``.

    Example:
        ```python
        net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
        model = torcheras.Model(net)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        history = model.fit(x, y, epochs=5, batch_size=32, validation_split=0.2)
        model.evaluate(x_test, y_test, return_dict=True)
        model.predict(x_test)
        ```
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(
                f"Model(module) takes a torch.nn.Module; got {type(module).__name__}. "
                "Build the network with torch.nn layers, or subclass torcheras.Model."
            )
        if module is not None:
            self.module = module
        self.stop_training = False
        self.stop_reason: str | None = None  # set with Callback.stop_training(reason)
        self._log_to: Any = None  # the running epoch's LogCollector (Model.log)
        self._example_input: Any = None  # two samples of fit's last batch, for summary()
        self.ema: ExponentialMovingAverage | None = None  # compile(ema_momentum=...)
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: History | None = None
        self.loss_fn: Any = None
        self.loss_name: str | None = None
        self.compiled_loss: losses.CompiledLoss | None = None
        self.compiled_metrics: list[metrics_lib.Metric] = []
        self.weighted_metrics: list[metrics_lib.Metric] = []
        self.device = torch.device("cpu")
        self._is_compiled = False
        self._compile_config: dict[str, Any] = {}
        self._fitting = False
        self._check_first_batch = False
        # the ranks of the inputs fit / evaluate / predict first gave it (loops.check_input_rank)
        self._first_input_ranks: Any = None
        self.loop = LoopState()
        self._initial_epoch: int | None = None
        self.precision = Precision("32")
        self.scaler: torch.amp.GradScaler | None = None
        self.gradient_accumulation_steps = 1
        self.jit_compile = False
        self._compiled: CompiledStep | None = None
        self._ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
        self._fsdp: nn.Module | None = None  # the FSDP root under torchrun (strategy="fsdp")
        self.strategy: str | distributed.FSDP = "auto"
        # How losses become optimizer steps (stepping.py): fit makes its own; this one serves
        # train_step run outside fit.
        self._stepping = Stepping(self, self.loop)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self._modules.get("module")
        if module is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no forward: pass a module, torcheras.Model(net), or "
                "subclass torcheras.Model and define forward()."
            )
        return module(*args, **kwargs)

    # ---- compile -----------------------------------------------------------------------------
    def compile(
        self,
        optimizer: Any = "rmsprop",
        loss: Any = None,
        metrics: Sequence[Any] | Mapping[Any, Any] | None = None,
        *,
        loss_weights: Mapping[Any, float] | Sequence[float] | None = None,
        weighted_metrics: Sequence[Any] | Mapping[Any, Any] | None = None,
        learning_rate: float | None = None,
        device: str | torch.device = "auto",
        precision: str = "32",
        jit_compile: bool = False,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        clipvalue: float | None = None,
        gradient_accumulation_steps: int = 1,
        ema_momentum: float | None = None,
        strategy: str | distributed.FSDP = "auto",
    ) -> None:
        """Configure training.

        Args:
            optimizer: a name (``"adam"``, ``"sgd"``, ...; Keras's defaults, torch's fused
                kernels on CUDA), a ``torch.optim.Optimizer``, or a callable taking the
                parameters.
            loss: a Keras or torch loss name, a Keras loss object
                (``torcheras.losses.BinaryCrossentropy(from_logits=False)``), a torch loss
                module (computed exactly as torch does) or ``loss(y_pred, y_true)``. For a
                model with several outputs (a dict, or a tuple), a dict of losses keyed by
                output (or a list in the tuple's order): see ``losses.MultiOutputLoss``.
            metrics: names, ``torchmetrics.Metric`` objects, or ``metric(y_pred, y_true)``;
                unweighted, as in Keras. With several outputs, per output:
                ``{"label": ["accuracy"]}`` (logged as ``label_accuracy``).
            loss_weights: with several outputs, each output's weight in the summed loss
                (a dict keyed like ``loss``, or a list); 1 where not given.
            weighted_metrics: metrics weighted by ``sample_weight`` / ``class_weight``.
            learning_rate: overrides the optimizer's learning rate.
            device: ``"auto"`` (CUDA, then MPS, then CPU) or any torch device.
            precision: ``"32"``, ``"bf16-mixed"`` (autocast to bfloat16) or ``"16-mixed"``
                (float16 with a GradScaler, kept in ``model.save`` and backups).
            jit_compile: compile the train step with ``torch.compile``: the forward pass, the
                loss and their backward as one graph, and the optimizer step.
            clipnorm: clip each parameter's gradient to this norm (Keras's meaning).
            global_clipnorm: clip all the gradients together to this global norm.
            clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]``.
            gradient_accumulation_steps: step the optimizer every N batches with the mean of
                their gradients (batch hooks still fire per batch; see ``optimizer_step``).
            ema_momentum: keep an exponential moving average of the weights (Keras's
                ``use_ema=True, ema_momentum=...``; 0.99 is Keras's default), updated on the
                device after each optimizer step; at the end of ``fit`` the weights become
                the average. ``SwapEMAWeights`` validates and checkpoints on it meanwhile.
            strategy: how several processes under ``torchrun`` share the work. ``"auto"``
                and ``"ddp"``: DistributedDataParallel (each rank holds the whole model);
                ``"fsdp"``: FSDP2, each rank holds 1/N of the parameters, gradients and
                optimizer state (``torcheras.distributed.FSDP(blocks=...,
                reshard_after_forward=...)`` to choose the blocks). In a single process
                every strategy trains as one process, so one script runs both ways.

        Example:
            ```python
            model.compile(optimizer="adam", loss="mse", metrics=["mae"])
            model.compile("adamw", "cross_entropy", precision="bf16-mixed", global_clipnorm=1.0)
            model.compile("adamw", "cross_entropy", strategy="fsdp")  # under torchrun
            ```
        """
        strategy = distributed.resolve_strategy(strategy)
        self.device = distributed.setup(resolve_device(device))  # torchrun: this rank's device
        self.precision = Precision(
            precision,
            self.device,
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            clipvalue=clipvalue,
        )
        self.gradient_accumulation_steps = data.as_int(
            gradient_accumulation_steps, "gradient_accumulation_steps", minimum=1
        )
        self.to(self.device)
        self.strategy = strategy
        if isinstance(strategy, distributed.FSDP):  # before the optimizer sees the parameters
            stepping.shard_for_ranks(self, strategy)
        elif self._fsdp is not None:
            raise ValueError(
                f"This model's parameters are sharded (compiled with strategy='fsdp'); "
                f"strategy={strategy!r} needs whole ones: build the model anew."
            )
        self.ema = (
            None
            if ema_momentum is None
            else ExponentialMovingAverage(
                [p for p in self.parameters() if p.requires_grad], ema_momentum
            )
        )
        self.optimizer = (
            None
            if optimizer is None
            else optimizers.get(
                optimizer,
                self.parameters(),
                learning_rate,
                fused=self.device.type == "cuda" and not jit_compile and self._fsdp is None,
            )
        )
        self.scaler = self.precision.scaler  # saved with the model and in backups
        self.loss_fn = loss
        self.compiled_loss = None if loss is None else losses.get(loss, loss_weights)
        self.loss_name = None if self.compiled_loss is None else self.compiled_loss.name
        self.compiled_metrics = self._resolve_metrics(metrics, "metrics")
        self.weighted_metrics = self._resolve_metrics(weighted_metrics, "weighted_metrics")
        names = [m.name for m in self.compiled_metrics + self.weighted_metrics]
        duplicates = {n for n in names if names.count(n) > 1} | ({"loss"} & set(names))
        if duplicates:
            raise ValueError(f"Metric names must be unique and not 'loss'; repeated: {duplicates}.")
        self.jit_compile = bool(jit_compile)
        self._compiled = CompiledStep(self) if jit_compile else None
        self._stepping = Stepping(self, self.loop)
        self._compile_config = {
            "optimizer": None if self.optimizer is None else type(self.optimizer).__name__,
            "loss": loss if isinstance(loss, str) else None,
            "metrics": [m for m in metrics or [] if isinstance(m, str)],
            "weighted_metrics": [m for m in weighted_metrics or [] if isinstance(m, str)],
            "complete": isinstance(loss, (str, type(None)))
            and all(isinstance(m, str) for m in [*(metrics or []), *(weighted_metrics or [])]),
            "settings": {  # plain values: a file records them, a bare model compiles with them
                "precision": self.precision.mode,
                "jit_compile": self.jit_compile,
                "clipnorm": clipnorm,
                "global_clipnorm": global_clipnorm,
                "clipvalue": clipvalue,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "ema_momentum": ema_momentum,
            },
        }
        self._is_compiled = True
        self._first_input_ranks = None

    def _resolve_metrics(self, metrics: Any, argument: str) -> list[metrics_lib.Metric]:
        if isinstance(self.compiled_loss, losses.MultiOutputLoss) and metrics is not None:
            return metrics_lib.per_output(metrics, self.compiled_loss, argument)
        if metrics is not None and (
            isinstance(metrics, (str, Mapping)) or not isinstance(metrics, Iterable)
        ):
            raise TypeError(
                f"`{argument}` must be a list, e.g. {argument}=['accuracy']; got {metrics!r}."
            )
        return [metrics_lib.get(m, self.compiled_loss) for m in (metrics or [])]

    @property
    def metrics(self) -> list[metrics_lib.Metric]:
        """Every metric the model updates: compiled, weighted, and the metric objects kept as
        attributes (tracked, as in Keras); all are reset at each epoch's start."""
        return self.compiled_metrics + self.weighted_metrics + list(self._tracked().values())

    def _tracked(self) -> dict[str, metrics_lib.Metric]:
        compiled = {id(getattr(m, "metric", m)) for m in self.compiled_metrics}
        compiled |= {id(getattr(m, "metric", m)) for m in self.weighted_metrics}
        return {
            name: m
            for name, m in metrics_lib.tracked(self).items()
            if id(getattr(m, "metric", m)) not in compiled
        }

    @property
    def metrics_names(self) -> list[str]:
        """The log keys ``evaluate`` returns, in its list's order: ``loss``, each output's
        loss (several outputs), then the metrics."""
        loss = self.compiled_loss
        names = [] if loss is None else ["loss"]
        if isinstance(loss, losses.MultiOutputLoss):
            names += loss.log_names.values()
        return names + [m.name for m in self.compiled_metrics + self.weighted_metrics]

    def metric_direction(self, name: str) -> str | None:
        """``"max"``/``"min"`` for a log key (``val_`` stripped), from the compiled metric."""
        base = name[4:] if name.startswith("val_") else name
        for metric in self.metrics:
            if metric.name == base:
                return metric.direction
        return metrics_lib.direction_of(base)

    # ---- learning rate and weights -----------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The learning rate of the first param group. Setting it keeps the ratios between
        param groups (see :func:`torcheras.optimizers.set_learning_rate`)."""
        if self.optimizer is None:
            raise AttributeError("The model has no optimizer: call compile(optimizer=...) first.")
        return optimizers.get_learning_rate(self.optimizer)

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if self.optimizer is None:
            raise AttributeError("The model has no optimizer: call compile(optimizer=...) first.")
        optimizers.set_learning_rate(self.optimizer, value)

    def get_weights(self) -> dict[str, Tensor]:
        """A detached copy of the model's state (on its device). A model sharded by FSDP
        gives whole tensors on every rank (every rank must call it), as :meth:`set_weights`
        takes them.

        Example:
            ```python
            before = model.get_weights()
            model.fit(x, y, epochs=1)
            model.set_weights(before)  # back to the weights before that epoch
            ```
        """
        if is_sharded(self):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            # gathered whole on every rank (a collective), as Keras's arrays are whole
            state = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True))
            return {k: v.detach().clone() for k, v in state.items()}
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def set_weights(self, weights: Mapping[str, Tensor] | Sequence[Any]) -> None:
        """Load weights from :meth:`get_weights`, or a list of arrays in ``state_dict`` order."""
        if not isinstance(weights, Mapping):
            keys = list(self.state_dict())
            if len(weights) != len(keys):
                raise ValueError(
                    f"set_weights got {len(weights)} arrays; the model has "
                    f"{len(keys)} tensors in its state_dict."
                )
            weights = {k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights)}
        if is_sharded(self) and not all(distributed.is_dtensor(w) for w in weights.values()):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            # whole tensors into a sharded model: each rank keeps its part of each
            set_model_state_dict(
                self, dict(weights), options=StateDictOptions(full_state_dict=True)
            )
            return
        self.load_state_dict(weights)

    def save_weights(self, filepath: str | os.PathLike[str]) -> None:
        """Save the weights atomically as the wrapped network names them: a plain state_dict
        (``.safetensors`` names use safetensors) that PyTorch reads without torcheras.

        Example:
            ```python
            model.save_weights("w.pt")
            net.load_state_dict(torch.load("w.pt"))  # the wrapped nn.Module, plain PyTorch
            model.load_weights("w.pt")
            ```
        """
        checkpoint.save_weights(own_weights(self), filepath)

    def save(self, filepath: str | os.PathLike[str]) -> None:
        """Save everything needed to continue training identically, atomically: weights,
        every optimizer's state, the LR schedulers and AMP scaler kept on the model, and the
        compile settings that are names (optimizer class, loss, metrics). Reload with
        :meth:`load`; :meth:`load_weights` reads the weights alone.

        Example:
            ```python
            model.save("run/model.pt")
            model.load("run/model.pt")  # or on a fresh, uncompiled Model of the same network
            ```
        """
        checkpoint.save(model_file_state(self), filepath)

    def load(self, filepath: str | os.PathLike[str]) -> None:
        """Load a file that holds a model, to continue training: a file written by
        :meth:`save`, a full ``ModelCheckpoint`` file, or a ``BackupAndRestore`` backup —
        weights, every optimizer, the schedulers, the scaler and the weight average.

        An uncompiled model is compiled first from what the file records (optimizer class,
        loss and metric names, precision, clipping, accumulation, ema_momentum); a model
        compiled with objects must be compiled the same way before loading.
        """
        state = read_model_file(filepath)
        if not self._is_compiled:
            self._compile_from(state.get("compile"), filepath)
        restore_model_state(
            self,
            state,
            f"The saved model {str(filepath)!r}",
            "Build the same network (and compile the same optimizer) before loading.",
        )

    def _compile_from(self, config: Mapping[str, Any] | None, filepath: Any) -> None:
        if not config:
            raise ValueError(
                f"{str(filepath)!r} does not record how its model was compiled (a file of an "
                "older release, or saved from a plain nn.Module): compile this model first, "
                "then load."
            )
        if not config.get("complete", False):
            raise ValueError(
                f"{str(filepath)!r} was saved from a model compiled with a loss or metric "
                "object, which a file cannot hold: compile this model the same way, then load."
            )
        name = config.get("optimizer")
        optimizer_cls = getattr(torch.optim, name, None) if name else None
        if name and name.startswith("Keras") and name in optimizers.__all__:
            optimizer_cls = getattr(optimizers, name)  # "adam" by name: KerasAdam
        self.compile(
            optimizer=None if optimizer_cls is None else optimizer_cls,
            loss=config.get("loss"),
            metrics=config.get("metrics") or None,
            weighted_metrics=config.get("weighted_metrics") or None,
            **config.get("settings", {}),
        )

    def train(self, mode: bool = True) -> Model:
        """``nn.Module.train``; a module frozen with :func:`torcheras.freeze` stays in eval
        mode (Keras's ``trainable = False``: BatchNorm keeps its statistics)."""
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self)
        return self

    def export(
        self,
        filepath: str | os.PathLike[str],
        format: str = "torch",
        *,
        input_example: Any = None,
        dynamic_batch: bool = True,
    ) -> Path:
        """Export the network for serving, in eval mode on the CPU, without the optimizer,
        loss or metrics: ``format="torch"`` writes a ``torch.export`` program (reload it with
        ``torch.export.load(path).module()``), ``format="onnx"`` an ONNX file (the ``onnx``
        extra) through torch's exporter. The batch dimension stays dynamic unless
        ``dynamic_batch=False``.

        Args:
            filepath: the file to write: ``.pt2`` for ``"torch"``, ``.onnx`` for ``"onnx"`` (a
                name ending in the other format's suffix is refused); a URL such as
                ``"s3://bucket/model.pt2"`` is written through fsspec, whole.
            format: ``"torch"`` or ``"onnx"``.
            input_example: a batch of inputs as ``fit`` takes them (tensor, numpy array, tuple
                or dict); default: two samples of the last batch ``fit`` ran.
            dynamic_batch: export the batch dimension as dynamic.

        Returns the path written. A network torch cannot trace raises
        :class:`torcheras.export.ExportError` naming the construct (data-dependent control
        flow, an operator without ONNX translation...) and the line of your code.

        Example:
            ```python
            model.fit(x, y, epochs=5)
            model.export("model.pt2")                 # torch.export.load("model.pt2").module()
            model.export("model.onnx", format="onnx")  # onnxruntime.InferenceSession(...)
            ```
        """
        from torcheras.export import export_module

        if is_sharded(self):
            raise ValueError(
                "export() needs the whole weights, and this model's are sharded over the "
                "processes (compile(strategy='fsdp')): save them gathered with "
                "model.save_weights('w.pt') (every process calls it), then in one process "
                "load them into a Model of the same network and export that one."
            )
        example = input_example if input_example is not None else self._example_input
        if example is None:
            raise ValueError(
                "export() needs an example batch to trace the network: pass "
                "input_example=x[:2] (inputs as fit takes them), or fit the model first."
            )
        module = self._modules.get("module")
        network = module if module is not None and not self._has_own_forward() else self
        return export_module(network, filepath, example, format=format, dynamic_batch=dynamic_batch)

    def load_weights(self, filepath: str | os.PathLike[str], strict: bool = True) -> None:
        """Load weights saved by torcheras, safetensors or ``torch.save(state_dict)``.

        Files are read with ``torch.load(weights_only=True)``: they cannot run code.
        """
        checkpoint.load_weights_into(self, filepath, strict=strict)

    def summary(
        self,
        print_fn: Callable[[str], Any] = print,
        *,
        input_shape: Sequence[int] | None = None,
        example_input: Any = None,
        show_trainable: bool = False,
    ) -> None:
        """Print each layer (Keras's ``Layer (type)``, ``Output Shape``, ``Param #``), then the
        totals; ``show_trainable`` adds Keras's ``Trainable`` column (``N``: frozen). Output
        shapes are shown once they are known: after ``fit`` has run a batch, or given
        ``input_shape`` (one sample, without the batch axis, as in Keras) or an
        ``example_input`` batch; the batch axis is printed as ``None``. Finding them runs one
        forward pass on two samples, without gradients, in eval mode (nothing changes).

        Example:
            ```python
            model.summary(input_shape=(1, 28, 28))
            ```
        """
        shapes = self._output_shapes(input_shape, example_input)
        rows = [("Layer (type)", "Output Shape", "Param #")]
        for name, module in self.named_modules():
            if name and not list(module.children()):
                count = sum(p.numel() for p in module.parameters(recurse=False))
                shown = name.removeprefix("module.")
                kind = distributed.original_class(module).__name__  # not FSDP<Name>
                rows.append((f"{shown} ({kind})", shapes.get(name, "?"),
                             f"{count:,}"))  # fmt: skip
        if not shapes:
            rows = [(layer, count) for layer, _, count in rows]  # type: ignore[misc]
        if show_trainable:
            flags = ["Trainable"] + [
                "-" if not params else "Y" if any(p.requires_grad for p in params) else "N"
                for name, module in self.named_modules()
                if name and not list(module.children())
                for params in [list(module.parameters(recurse=False))]
            ]
            rows = [(*row, flag) for row, flag in zip(rows, flags)]  # type: ignore[misc]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        line = "-" * (sum(widths) + 3 * (len(widths) - 1))
        print_fn(f'Model: "{distributed.original_class(self).__name__}"')
        print_fn(line)
        for i, row in enumerate(rows):
            cells = [f"{c:<{w}}" for c, w in zip(row[:-1], widths)] + [f"{row[-1]:>{widths[-1]}}"]
            print_fn("   ".join(cells))
            if i == 0:
                print_fn(line)
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        print_fn(line)
        print_fn(f"Total params: {total:,}")
        print_fn(f"Trainable params: {trainable:,}")
        print_fn(f"Non-trainable params: {total - trainable:,}")
        if not shapes:
            print_fn("Output shapes: unknown until fit runs a batch, or pass input_shape=.")

    def _output_shapes(self, input_shape: Any, example_input: Any) -> dict[str, str]:
        """Each leaf module's output shape as Keras prints it, from one forward pass on two
        samples of ``example_input``, of zeros of ``input_shape``, or of the last batch fit
        saw; empty when none is available."""
        if example_input is None and input_shape is not None:
            example_input = torch.zeros(2, *input_shape, device=self.device)
        elif example_input is None:  # fit's batch on the device, or two samples kept after
            batch = self.loop.current_batch
            example_input = self._example_input if batch is None else data.unpack(batch)[0]
        if example_input is None:
            return {}
        example = tensors.map_tensors(lambda t: t.to(self.device), tensors.head(example_input, 2))
        shapes: dict[str, str] = {}

        def shape_of(out: Any) -> str:
            if isinstance(out, Tensor):
                return str((None, *out.shape[1:])).replace("'", "")
            if isinstance(out, (tuple, list)):
                return "[" + ", ".join(shape_of(o) for o in out) + "]"
            return type(out).__name__

        def record(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                shapes[name] = shape_of(out)

            return hook

        handles = [
            module.register_forward_hook(record(name))
            for name, module in self.named_modules()
            if name and not list(module.children())
        ]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                module = self._modules.get("module")
                plain = module is not None and not self._has_own_forward()
                _call(module if plain else self, example)
        finally:
            stepping.reshard(self)  # FSDP: only the shards again
            self.train(was_training)
            for handle in handles:
                handle.remove()
        return shapes

    # ---- steps (override these) --------------------------------------------------------------
    def call_on(self, x: Any) -> Any:
        """Run the model on ``x``: a tensor, a tuple (``forward(*x)``) or a dict (``**x``)."""
        if self._ddp is not None and self.training:  # gradients all-reduced across ranks
            return _call(self._ddp, x)
        if self._compiled is not None and not torch.compiler.is_compiling():
            return _call(self._compiled.forward, x)  # not inside the compiled train step
        module = self._modules.get("module")
        if (
            module is None
            or self._forward_hooks
            or self._forward_pre_hooks
            or type(self).forward is not Model.forward  # a subclass's own forward
        ):
            return _call(self, x)
        # the wrapped module itself: one module call, not two
        return module(x) if type(x) is Tensor else _call(module, x)

    def autocast(self) -> AbstractContextManager[None]:
        """The compiled precision's autocast (nothing under ``"32"``): wrap the forward pass
        and the loss in it in a custom ``train_step``."""
        return self.precision.autocast()

    def compute_loss(
        self, x: Any, y: Any, y_pred: Any, sample_weight: Tensor | None = None
    ) -> Tensor:
        """The compiled loss of one batch (weighted by ``sample_weight``)."""
        loss = self.compiled_loss
        if loss is None:
            raise ValueError("No loss was compiled: call compile(loss=...) or override train_step.")
        if y is None:
            raise ValueError(
                "The batch has no targets: the default train_step/test_step need (x, y) or "
                "(x, y, sample_weight) batches (your DataLoader or generator yields inputs "
                "alone). Yield (x, y) pairs, or override train_step to train without targets."
            )
        if self._check_first_batch:  # once per fit / evaluate: label form and logits trap
            self._check_first_batch = False
            loss.check(y_pred, y)
        if type(loss) is losses.MultiOutputLoss:
            total, parts = loss.with_parts(y_pred, y, sample_weight)
            self._log_output_losses(parts)
            return total
        return loss(y_pred, y, sample_weight)

    def _log_output_losses(self, parts: Mapping[str, Tensor]) -> None:
        """Each output's own loss in the logs (``<output>_loss``), as Keras logs them."""
        if self._log_to is not None:
            for name, value in parts.items():
                self._log_to.log(name, value)

    def find_learning_rate(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int | None = None,
        min_lr: float = 1e-7,
        max_lr: float = 10.0,
        num_steps: int = 200,
        smoothing: float = 0.98,
        divergence_factor: float = 4.0,
    ) -> Any:
        """The learning-rate range test: train ``num_steps`` batches with the rate rising
        geometrically from ``min_lr`` to ``max_lr`` (stopping early once the smoothed loss
        exceeds ``divergence_factor`` times its best), then put everything back: weights,
        every optimizer's state, the LR schedulers, the scaler, the weight average, the
        gradients and the RNG states are exactly as before the call.

        Returns a result with ``learning_rates``, ``losses`` (raw and ``smoothed``),
        ``suggestion`` (a tenth of the rate where the smoothed loss is lowest; None if the
        loss never fell), the ``rule`` used, and ``plot(path)``.

        Example:
            ```python
            found = model.find_learning_rate(x, y, batch_size=64)
            found.plot("lr_range.png")
            model.learning_rate = found.suggestion
            ```
        """
        from torcheras.lr_finder import find_learning_rate

        self._check_compiled("find_learning_rate")
        return find_learning_rate(
            self, x, y, batch_size=batch_size, min_lr=min_lr, max_lr=max_lr,
            num_steps=num_steps, smoothing=smoothing, divergence_factor=divergence_factor,
        )  # fmt: skip

    def log(self, name: str, value: Tensor | float, weight: float | None = None) -> None:
        """Add ``value`` to the logs under ``name``: a running mean over the epoch, weighted by
        the batch size (or ``weight``), exactly like the values ``train_step`` returns. Call it
        inside ``train_step`` / ``test_step`` (values logged while validating become
        ``val_<name>``) or from a callback's batch hook. A tensor stays on the device (no
        synchronisation) until the logs are read; History, CSVLogger, TensorBoard and the
        progress bar show it. Under torchrun, log the same names on every rank.

        Example:
            ```python
            class MyModel(torcheras.Model):
                def train_step(self, batch):
                    logs = super().train_step(batch)
                    self.log("weight_norm", torch.linalg.vector_norm(self.module[0].weight))
                    return logs
            ```
        """
        collector = self._log_to
        if collector is None:
            raise RuntimeError(
                f"log({name!r}, ...) was called outside fit and evaluate: it adds to the logs "
                "of the running epoch. Call it from train_step, test_step or a callback's "
                "batch hook."
            )
        collector.log(name, value, weight)

    def update_metrics(self, y_pred: Any, y: Any, sample_weight: Tensor | None = None) -> None:
        """Update the compiled metrics (unweighted) and the weighted metrics, as in Keras."""
        for metric in self.compiled_metrics:
            metric.update(y_pred, y)
        for metric in self.weighted_metrics:
            metric.update(y_pred, y, sample_weight)

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss``: weighed by this rank's share of the global batch under
        torchrun, divided by ``gradient_accumulation_steps``, scaled under ``"16-mixed"``.
        When the batch completes its accumulation group (always, without accumulation) the
        gradients are unscaled and ``on_after_backward`` fires. See ``stepping.py``."""
        self._stepping.backward(loss)

    def optimizer_step(self) -> None:
        """One optimizer update: clip the gradients (``clipnorm`` / ``global_clipnorm`` /
        ``clipvalue``), apply them (the compiled step under ``jit_compile``; the scaler's step
        under ``"16-mixed"``), then update the weight average (``ema_momentum``).

        The default ``train_step`` calls it exactly once per real optimizer step: once per
        accumulation group, including the short group an epoch ends with. Override it for a
        custom update and call ``super().optimizer_step()`` to keep clipping, loss scaling
        and the average. Called inside a group (``self.loop.accumulating``), it does nothing.

        Example:
            ```python
            class MyModel(torcheras.Model):
                def optimizer_step(self):
                    super().optimizer_step()
                    print("update", self.loop.optimizer_steps + 1)
            ```
        """
        self._stepping.apply()

    def train_step(self, batch: Any) -> dict[str, Any]:
        """One optimisation step on ``batch``; returns the values to log (tensors are fine).

        The loop keeps a running mean of each returned value over the epoch; a metric's
        result (``{"loss": self.total_loss_tracker.result()}``, whatever the key) logs that
        metric's result instead, as in Keras. Override it for custom training (two optimizers,
        a GAN...): use ``with self.autocast():`` for the forward pass and
        ``self.backward(loss)`` to keep mixed precision, accumulation and
        ``on_after_backward``.

        Where nothing can tell the difference (no seam below overridden, float32, one
        process, every batch a step), ``fit`` runs this body with the seams' calls inlined:
        the same torch calls, fewer Python ones.
        """
        x, y, sample_weight = data.unpack(batch)
        self._stepping.zero_grad()  # at a group's start (every batch without accumulation)
        if self._compiled is not None and y is not None:
            y_pred, loss = self._compiled.forward_loss(x, y, sample_weight)
        elif self.precision.dtype is None:  # float32: no autocast context to enter per batch
            y_pred = self.call_on(x)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        else:
            with self.precision.autocast():
                y_pred = self.call_on(x)
                loss = self.compute_loss(x, y, y_pred, sample_weight)
        self.backward(loss)
        if not self.loop.accumulating:  # the group is complete: one optimizer step
            self.optimizer_step()
        if self.compiled_metrics or self.weighted_metrics:
            self.update_metrics(y_pred, y, sample_weight)
        return {"loss": loss}

    def _inlined_train_parts(self, guarded: bool = True) -> InlinedTrainParts | None:
        """What the default :meth:`train_step` calls, for a loop that runs its body with the
        seams inlined (``Stepping.plain``: one process, every batch a step, nothing between
        backward and the step): the same calls to torch in the same order, ~12 Python calls a
        batch fewer. None where a difference could show: a seam of the step overridden (on
        the class or the instance; one set during an epoch counts from the next, as the plain
        path's settings do, or from the next batch after work run between batches, which
        fetches the parts again), a mixed precision, several outputs' losses, weighted metrics, a
        subclass's own ``forward``, no optimizer; ``guarded=False`` (no callback runs between
        the epoch's batches, so nothing can replace the parts or add a hook mid-epoch): a
        forward hook on the model too. Whoever runs the body sends :meth:`train_step` itself
        a batch that is not an ``(x, y)`` pair with a tensor ``x`` and a ``y`` (not None),
        the first batch of a fit
        (``_check_first_batch``: its one-time checks), and, ``guarded``, any batch after a
        forward hook was added or the optimizer, loss, metrics or module replaced
        (:meth:`_replaced_since`). Two run it: :meth:`_inlined_train_step` (a step between
        callbacks) and the plain batch loop (``FitLoop._run_plain_batches``)."""
        if not self._can_inline(_DEFAULT_SEAMS) or self.optimizer is None:
            return None
        if not guarded and (self._forward_hooks or self._forward_pre_hooks):
            return None
        loss_fn = self.compiled_loss
        return InlinedTrainParts(
            self._modules["module"],
            loss_fn,
            loss_fn.fused_float32(),  # the loss's own torch function, for float32 outputs
            self.optimizer,
            self.compiled_metrics,  # the live list (compile makes new ones)
        )

    def _inlined_train_step(
        self, guarded: bool = True
    ) -> Callable[[Any], Tensor | dict[str, Any]] | None:
        """The default :meth:`train_step` with its seams inlined (:meth:`_inlined_train_parts`),
        as one call a batch. It returns the loss alone (the logs ``{"loss": loss}``; the loop
        adds it with ``LogCollector.add_loss``), or :meth:`train_step`'s logs where it falls
        back. None where :meth:`_inlined_train_parts` says no."""
        parts = self._inlined_train_parts(guarded)
        if parts is None:
            return None
        module, loss_fn, fused, optimizer, metrics = parts
        train_step = self.train_step

        def step(batch: Any) -> Tensor | dict[str, Any]:
            if (
                (type(batch) is not tuple and type(batch) is not list)
                or len(batch) != 2
                or type(batch[0]) is not Tensor
                or batch[1] is None
                or self._check_first_batch
                or (guarded and self._replaced_since(optimizer, loss_fn, metrics, module))
            ):
                return train_step(batch)
            x, y = batch
            optimizer.zero_grad(set_to_none=True)  # Stepping.zero_grad
            y_pred = module(x)  # call_on
            if fused is not None and y_pred.dtype is torch.float32:  # compute_loss
                loss = fused(y_pred, y)  # what loss_fn(y_pred, y) runs, called directly
            else:
                loss = loss_fn(y_pred, y)
            loss.backward()  # backward -> Stepping.backward, plain
            optimizer.step()  # optimizer_step -> Stepping.apply, plain
            for metric in metrics:  # update_metrics
                metric.update(y_pred, y)
            return loss  # the logs {"loss": loss}, which the loop adds without the dict

        return step

    def _replaced_since(self, optimizer: Any, loss_fn: Any, metrics: Any, module: Any) -> bool:
        """Whether an inlined step must take the step itself now: a forward hook on the model,
        or an optimizer, loss, metrics or module other than those it was made with."""
        return bool(
            self._hooked_or_replaced(module)
            or self.optimizer is not optimizer  # replaced by a callback (or compile)
            or self.compiled_loss is not loss_fn
            or self.compiled_metrics is not metrics
            or self.weighted_metrics
        )

    def _can_inline(self, seams: dict[str, Any], loss: bool = True) -> bool:
        """Whether a default step's body can run with its ``seams`` inlined: none overridden
        (on the class or the instance), the wrapped module's own ``forward``, float32, no
        compiled (``jit_compile``) forward; ``loss``: a step that computes the loss and the
        metrics, which needs one compiled loss and no weighted metrics too."""
        cls = type(self)
        return not (
            any(getattr(cls, name) is not seam for name, seam in seams.items())
            or any(name in self.__dict__ for name in seams)
            or cls.forward is not Model.forward
            or self.precision.dtype is not None
            or (loss and type(self.compiled_loss) is not losses.CompiledLoss)
            or (loss and self.weighted_metrics)
            or self._compiled is not None
            or "module" not in self._modules
        )

    def _hooked_or_replaced(self, module: Any) -> bool:
        """A forward hook on the model, or a wrapped module other than ``module``."""
        return bool(
            self._forward_hooks
            or self._forward_pre_hooks
            or self._modules.get("module") is not module
        )

    def _inlined_test_step(
        self, guarded: bool = True
    ) -> Callable[[Any], Tensor | dict[str, Any]] | None:
        """The default :meth:`test_step` with its seams inlined, for one evaluation pass (as
        :meth:`_inlined_train_step` for training): the same torch calls, ~8 Python calls a
        batch fewer. It returns the loss alone (the logs ``{"loss": loss}``), or
        :meth:`test_step`'s logs where it falls back: for a batch that is not an ``(x, y)``
        pair with a tensor ``x``, the first batch (its one-time checks), a forward hook on the
        model (``on_test_batch_outputs``'s), or a loss, metrics or module replaced since the
        pass began. None where :meth:`_can_inline` says no. ``guarded=False``: no callback
        runs between the pass's batches (as for :meth:`_inlined_train_step`)."""
        if not self._can_inline(_TEST_SEAMS):
            return None
        if not guarded and (self._forward_hooks or self._forward_pre_hooks):
            return None
        modules = self._modules
        module, loss_fn, metrics = modules["module"], self.compiled_loss, self.compiled_metrics
        fused = loss_fn.fused_float32()  # the loss's own torch function, for float32 outputs
        test_step = self.test_step

        def step(batch: Any) -> Tensor | dict[str, Any]:
            if (
                (type(batch) is not tuple and type(batch) is not list)
                or len(batch) != 2
                or type(batch[0]) is not Tensor
                or batch[1] is None
                or self._check_first_batch
                or (guarded and self._replaced_since(self.optimizer, loss_fn, metrics, module))
            ):
                return test_step(batch)
            x, y = batch
            y_pred = module(x)  # call_on
            if fused is not None and y_pred.dtype is torch.float32:  # compute_loss
                loss = fused(y_pred, y)  # what loss_fn(y_pred, y) runs, called directly
            else:
                loss = loss_fn(y_pred, y)
            for metric in metrics:  # update_metrics
                metric.update(y_pred, y)
            return loss

        return step

    def test_step(self, batch: Any) -> dict[str, Any]:
        """Loss and metrics of one batch, without gradients."""
        x, y, sample_weight = data.unpack(batch)
        if self.precision.dtype is None:  # float32: no autocast context to enter per batch
            y_pred = self.call_on(x)
            loss = (
                None
                if self.compiled_loss is None
                else self.compute_loss(x, y, y_pred, sample_weight)
            )
        else:
            with self.precision.autocast():
                y_pred = self.call_on(x)
                loss = (
                    None
                    if self.compiled_loss is None
                    else self.compute_loss(x, y, y_pred, sample_weight)
                )
        self.update_metrics(y_pred, y, sample_weight)
        return {} if loss is None else {"loss": loss}

    def predict_step(self, batch: Any) -> Any:
        """The model's outputs for one batch."""
        # predict's batches of inputs alone are 1-tuples: unpacked here without a call
        x = batch[0] if type(batch) is tuple and len(batch) == 1 else data.unpack(batch)[0]
        if self.precision.dtype is None:  # float32: no autocast context to enter per batch
            return self.call_on(x)
        with self.precision.autocast():
            return self.call_on(x)

    def _inlined_predict_step(self, guarded: bool = True) -> Callable[[Any], Any] | None:
        """The default :meth:`predict_step` with ``call_on`` inlined, for one predict pass:
        the wrapped module called on the batch's inputs, as :meth:`predict_step` calls it
        there. None where a seam is overridden (on the class or the instance), for a
        subclass's own ``forward``, a mixed precision, a compiled forward, or a forward hook
        on the model. A batch that is not a 1-tuple of a tensor takes :meth:`predict_step`;
        ``guarded`` (a callback runs between batches): so does one after a forward hook was
        added to the model or its module replaced."""
        if not self._can_inline(_PREDICT_SEAMS, loss=False) or (
            self._forward_hooks or self._forward_pre_hooks
        ):
            return None
        module = self._modules["module"]
        predict_step = self.predict_step

        def step(batch: Any) -> Any:
            if (
                type(batch) is not tuple
                or len(batch) != 1
                or type(batch[0]) is not Tensor
                or (guarded and self._hooked_or_replaced(module))
            ):
                return predict_step(batch)
            return module(batch[0])  # predict_step -> call_on -> the wrapped module

        return step

    def _overrides_compute_loss(self) -> bool:
        return type(self).compute_loss is not Model.compute_loss

    def _has_own_forward(self) -> bool:
        """A subclass with its own ``forward`` (rather than a wrapped module's)."""
        return type(self).forward is not Model.forward

    def _predict_output(self, out: Any) -> Any:
        """Mixed-precision outputs come back as float32 (numpy has no bfloat16)."""
        if not self.precision.mixed:
            return out
        return tensors.map_tensors(
            lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, out
        )

    def _expect_padded_labels(self, may_pad: bool) -> None:
        """Tell the built-in metrics whether this pass's labels may hold -100 (padding): not
        when the default steps score labels of arrays that hold none (looked at once)."""
        for metric in self.compiled_metrics + self.weighted_metrics:
            inner = getattr(metric, "metric", metric)  # an output's metric (several outputs)
            if isinstance(inner, metrics_lib.MeanMetric):
                inner.padded_labels = may_pad

    def reset_metrics(self) -> None:
        for metric in self.metrics:
            metric.reset()

    def _collector(self) -> LogCollector:
        return LogCollector(self.compiled_metrics + self.weighted_metrics, self._tracked())

    # ---- fit ---------------------------------------------------------------------------------
    def _check_compiled(self, method: str) -> None:
        if not self._is_compiled:
            raise RuntimeError(
                f"{method}() needs compile() first: call model.compile(optimizer='adam', "
                "loss='sparse_categorical_crossentropy') (or your own optimizer and loss)."
            )

    def _check_not_fitting(self) -> None:
        if self._fitting:
            raise RuntimeError(
                "fit() was called while fit() is running on this model (from a "
                "callback?). A nested fit would replace the running one's History and state: "
                "call it after fit() returns, or on another model."
            )

    def _uses_default_train_step(self) -> bool:
        return type(self).train_step is Model.train_step

    def _uses_default_test_step(self) -> bool:
        return type(self).test_step is Model.test_step

    def _uses_default_predict_step(self) -> bool:
        return type(self).predict_step is Model.predict_step

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose: str | int = "auto",
        callbacks: Sequence[Callback] | None = None,
        validation_split: float = 0.0,
        validation_data: Any = None,
        shuffle: bool = True,
        class_weight: Mapping[int, float] | None = None,
        sample_weight: Any = None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int | Sequence[int] = 1,
        validation_interval: int | None = None,
    ) -> History:
        """Train for ``epochs`` epochs (``epochs`` is the index of the final epoch, as Keras).

        Returns the :class:`History`. Arguments have Keras's meaning; ``x`` may be arrays,
        tensors, a pandas DataFrame, a tuple/dict of them, a ``Dataset``, a ``DataLoader`` or
        an iterable of batches. With ``steps_per_epoch``, a loader or generator continues
        where the last epoch stopped and restarts only when exhausted.

        ``validation_interval=N`` (beyond Keras): also validate every N optimizer steps
        (counted across epochs; with ``gradient_accumulation_steps`` a step is a whole group,
        never a micro-batch), inside the epochs. Epoch ends still validate as
        ``validation_freq`` says, and a step is never validated twice (an epoch ending on a
        multiple of N validates once). Each validation fires ``on_test_begin`` /
        ``on_test_end`` and ``on_validation_end(step, logs)``; EarlyStopping,
        ReduceLROnPlateau and ModelCheckpoint(save_best_only=True) watching a ``val_*`` key
        decide after each one (their ``patience`` counts validations), so a stop ends
        training after that batch. ``history.validation_history`` and CSVLogger's
        ``<name>.validation.csv`` hold every validation with its ``step`` and ``epoch``.

        Example:
            ```python
            history = model.fit(x, y, epochs=3, validation_split=0.2, validation_interval=50,
                                callbacks=[EarlyStopping(patience=4)])
            history.validation_history["step"]  # [50, 100, ...]
            ```
        """
        self._check_compiled("fit")
        self._check_not_fitting()
        default_step = self._uses_default_train_step()
        if default_step:
            if self.compiled_loss is None:
                raise ValueError(
                    "fit() needs a loss: call compile(loss=...) or override train_step."
                )
            if self.optimizer is None:
                raise ValueError("fit() needs an optimizer: call compile(optimizer='adam').")
        _check_verbose(verbose)
        epochs = data.as_int(epochs, "epochs")
        initial_epoch = data.as_int(initial_epoch, "initial_epoch")
        if steps_per_epoch is not None:
            steps_per_epoch = data.as_int(steps_per_epoch, "steps_per_epoch", minimum=1)
        if validation_interval is not None:
            validation_interval = data.as_int(validation_interval, "validation_interval", 1)
        train_source, val_source = data.make_fit_sources(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            shuffle=shuffle,
            class_weight=class_weight,
            steps_per_epoch=steps_per_epoch,
            epochs_to_run=epochs - initial_epoch,
            validation_split=validation_split,
            validation_data=validation_data,
            validation_steps=validation_steps,
            validation_batch_size=validation_batch_size,
            validation_freq=validation_freq,
            need_y=default_step,
            one_hot_targets=getattr(self.compiled_loss, "target", None) == "categorical",
        )
        if validation_interval is not None and val_source is None:
            raise ValueError(
                f"fit(validation_interval={validation_interval}) validates every "
                f"{validation_interval} steps, but there is no validation data: pass "
                "validation_data or validation_split, or drop validation_interval."
            )
        interval = (
            {} if validation_interval is None else {"validation_interval": validation_interval}
        )
        callback_list = CallbackList(
            callbacks,
            add_history=True,
            add_progbar=verbose != 0,
            model=self,
            verbose=verbose,
            epochs=epochs,
            steps=train_source.steps,
            **interval,  # in params only when given: Keras's params otherwise
        )
        self._fitting = True
        try:
            return loops.fit(
                self,
                train_source,
                val_source,
                callback_list,
                epochs=epochs,
                initial_epoch=initial_epoch,
                validation_freq=validation_freq,
                validation_steps=validation_steps,
                validation_interval=validation_interval,
            )
        finally:
            self._fitting = False

    def _single_pass_callbacks(
        self, callbacks: Sequence[Callback] | None, verbose: str | int, steps: int | None
    ) -> CallbackList:
        """The callback list of ``evaluate`` / ``predict``: one pass, no History."""
        return CallbackList(
            callbacks, add_progbar=verbose != 0, model=self, verbose=verbose, epochs=1, steps=steps
        )

    # ---- evaluate ----------------------------------------------------------------------------
    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        sample_weight: Any = None,
        steps: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        return_dict: bool = False,
    ) -> float | list[float] | dict[str, float]:
        """Loss and metrics on ``x``: a float (loss only), ``[loss, *metrics]``, or a dict."""
        self._check_compiled("evaluate")
        _check_verbose(verbose)
        source = data.make_source(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            shuffle=False,
            steps=steps,
            need_y=type(self).test_step is Model.test_step,
        )
        callback_list = self._single_pass_callbacks(callbacks, verbose, steps or source.steps)
        self._check_first_batch = True
        logs = loops.evaluate(self, source, callback_list, steps)
        if return_dict:
            return logs
        ordered = [logs[k] for k in self.metrics_names if k in logs]
        ordered += [v for k, v in logs.items() if k not in self.metrics_names]
        return ordered[0] if len(ordered) == 1 else ordered

    # ---- predict -----------------------------------------------------------------------------
    def predict(
        self,
        x: Any,
        batch_size: int | None = None,
        verbose: str | int = "auto",
        steps: int | None = None,
        callbacks: Sequence[Callback] | None = None,
    ) -> Any:
        """The model's outputs for ``x``, concatenated: numpy in, numpy out; else CPU tensors."""
        _check_verbose(verbose)
        numpy_in = (
            isinstance(x, np.ndarray)
            or data._is_pandas(x)
            or (
                isinstance(x, (tuple, list, Mapping))
                and all(
                    isinstance(v, np.ndarray) for v in (x.values() if isinstance(x, Mapping) else x)
                )
            )
        )
        source = data.make_source(
            x, None, None, batch_size=batch_size, shuffle=False, steps=steps, need_y=False
        )
        callback_list = self._single_pass_callbacks(callbacks, verbose, steps or source.steps)
        result = loops.predict(self, source, callback_list, steps)
        return tensors.to_numpy(result) if numpy_in else result


class InlinedTrainParts(NamedTuple):
    """What the default ``train_step`` calls (``Model._inlined_train_parts``): the parts a
    loop runs its body with."""

    module: nn.Module  # call_on: the wrapped module
    loss_fn: Any  # compute_loss: the compiled loss
    fused: Callable[[Tensor, Tensor], Tensor] | None  # its torch function for float32 outputs
    optimizer: torch.optim.Optimizer
    metrics: list[Any]  # update_metrics: the compiled metrics


# What the default train_step calls, as Model defines them: overriding any (in a subclass, on
# the instance, or by patching Model itself) keeps every batch on train_step.
_DEFAULT_SEAMS: dict[str, Any] = {
    name: Model.__dict__[name]
    for name in ("train_step", "call_on", "compute_loss", "backward", "optimizer_step",
                 "update_metrics")
}  # fmt: skip
_TEST_SEAMS: dict[str, Any] = {
    name: Model.__dict__[name]
    for name in ("test_step", "call_on", "compute_loss", "update_metrics")
}
_PREDICT_SEAMS: dict[str, Any] = {
    name: Model.__dict__[name] for name in ("predict_step", "call_on")
}
