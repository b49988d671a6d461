"""Callbacks: Keras's hooks and built-ins, one per file."""

from torcheras.callbacks.backup_and_restore import BackupAndRestore, Preempted
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.callback_list import CallbackList
from torcheras.callbacks.csv_logger import CSVLogger
from torcheras.callbacks.early_stopping import EarlyStopping
from torcheras.callbacks.gradient_monitor import GradientMonitor
from torcheras.callbacks.history import History
from torcheras.callbacks.image_logger import ImageLogger
from torcheras.callbacks.lambda_callback import LambdaCallback
from torcheras.callbacks.learning_rate_scheduler import LearningRateScheduler
from torcheras.callbacks.mlflow_logger import MLflowLogger
from torcheras.callbacks.model_checkpoint import ModelCheckpoint
from torcheras.callbacks.optuna_pruning import OptunaPruning
from torcheras.callbacks.prediction_logger import PredictionLogger
from torcheras.callbacks.progbar_logger import ProgbarLogger
from torcheras.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from torcheras.callbacks.remote_monitor import RemoteMonitor
from torcheras.callbacks.swap_ema_weights import SwapEMAWeights
from torcheras.callbacks.tensorboard import TensorBoard
from torcheras.callbacks.terminate_on_nan import TerminateOnNaN
from torcheras.callbacks.throughput_monitor import ThroughputMonitor
from torcheras.callbacks.timer import Timer
from torcheras.callbacks.wandb_logger import WandbLogger

__all__ = [
    "BackupAndRestore",
    "Preempted",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "GradientMonitor",
    "History",
    "ImageLogger",
    "LambdaCallback",
    "LearningRateScheduler",
    "MLflowLogger",
    "ModelCheckpoint",
    "PredictionLogger",
    "ProgbarLogger",
    "ReduceLROnPlateau",
    "RemoteMonitor",
    "SwapEMAWeights",
    "TensorBoard",
    "TerminateOnNaN",
    "Timer",
    "OptunaPruning",
    "WandbLogger",
    "ThroughputMonitor",
]
