"""scikit-learn estimators around a torcheras model, with Keras 3's names
(``keras.wrappers.SKLearnClassifier`` / ``SKLearnRegressor`` / ``SKLearnTransformer``).

They work wherever scikit-learn takes an estimator: ``Pipeline``, ``GridSearchCV``,
``cross_val_score``, ``clone``. Import this module explicitly (``from torcheras.wrappers
import SKLearnClassifier``); it needs the ``sklearn`` extra.

Parameters reach their destination by prefix, as in scikit-learn's pipelines: ``model__hidden``
goes to the model-building function, ``compile__learning_rate`` to ``Model.compile`` and
``fit__epochs`` to ``Model.fit``; all of them are estimator parameters (``get_params``,
``set_params``, grid searches).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ImportError:  # pragma: no cover - the sklearn extra is missing
    raise ImportError(
        "torcheras.wrappers needs scikit-learn: pip install 'torcheras[sklearn]'."
    ) from None

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(estimator: Any, *args: Any, **kwargs: Any) -> Any:
        return estimator._validate_data(*args, **kwargs)


from torcheras.model import Model

__all__ = ["SKLearnClassifier", "SKLearnRegressor", "SKLearnTransformer"]

ROUTES = ("model", "compile", "fit")


def _route(key: str) -> str | None:
    """The destination of a routed parameter (``"fit"`` for ``fit__epochs``), else None."""
    prefix, sep, rest = key.partition("__")
    return prefix if sep and rest and prefix in ROUTES else None


class _SKLearnBase(BaseEstimator):
    """What the three estimators share: parameters, building, fitting, predicting."""

    _default_loss = "mse"
    _multi_output = True

    def __init__(
        self,
        model: Callable[..., nn.Module] | nn.Module,
        warm_start: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        fit_kwargs: dict[str, Any] | None = None,
        compile_kwargs: dict[str, Any] | None = None,
        random_state: int | np.random.RandomState | None = None,
        **kwargs: Any,
    ) -> None:
        self.model = model
        self.warm_start = warm_start
        self.model_kwargs = model_kwargs
        self.fit_kwargs = fit_kwargs
        self.compile_kwargs = compile_kwargs
        self.random_state = random_state
        for key, value in kwargs.items():
            setattr(self, key, value)

    # ---- parameters --------------------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters and the routed ones (``model__*``, ``compile__*``,
        ``fit__*``)."""
        params = super().get_params(deep=deep)
        params.update({k: getattr(self, k) for k in self._extra_names()})
        return params

    def set_params(self, **params: Any) -> _SKLearnBase:
        """Set parameters, routed ones included (``set_params(fit__epochs=5)``)."""
        extra = self._extra_names()
        for key in [k for k in params if _route(k) or k in extra]:
            setattr(self, key, params.pop(key))
        if params:
            super().set_params(**params)
        return self

    def _extra_names(self) -> list[str]:
        """The keyword parameters given beyond the signature's (fitted attributes end in
        ``_``, private ones start with it)."""
        own = self._get_param_names()
        return [k for k in vars(self) if k not in own and not k.startswith("_") and k[-1] != "_"]

    def _check_routes(self) -> None:
        for key in self._extra_names():
            if _route(key) is None:
                raise ValueError(
                    f"{type(self).__name__} got the parameter {key!r}, which has no "
                    f"destination: write model__{key}= (the model function), "
                    f"compile__{key}= (Model.compile) or fit__{key}= (Model.fit)."
                )

    def _routed(self, destination: str) -> dict[str, Any]:
        start = destination + "__"
        return {k[len(start) :]: v for k, v in vars(self).items() if k.startswith(start)}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def __sklearn_tags__(self) -> Any:  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        if self._multi_output:
            tags.target_tags.multi_output = True
        return tags

    def _more_tags(self) -> dict[str, Any]:  # older scikit-learn
        return {"multioutput": self._multi_output, "preserves_dtype": [np.float32]}

    # ---- building and fitting ----------------------------------------------------------------
    def _build(self, X: np.ndarray, y: np.ndarray, known: dict[str, Any]) -> Model:
        kwargs = {**(self.model_kwargs or {}), **self._routed("model")}
        if isinstance(self.model, nn.Module):
            if kwargs:
                raise ValueError(
                    f"model_kwargs / model__ parameters {sorted(kwargs)} go to a function that "
                    "builds the model, but `model` is a module instance: pass the function."
                )
            built: Any = copy.deepcopy(self.model)  # each fit starts from the given weights
        elif callable(self.model):
            built = self.model(**self._builder_arguments(X, y, known, kwargs), **kwargs)
        else:
            raise TypeError(
                "`model` must be a function returning a torcheras.Model or torch.nn.Module, "
                f"or such a module; got {type(self.model).__name__}."
            )
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"The model function returned {type(built).__name__}; it must return a "
                "torcheras.Model or a torch.nn.Module."
            )
        model = built if isinstance(built, Model) else Model(built)
        compile_kwargs = {**(self.compile_kwargs or {}), **self._routed("compile")}
        if model._is_compiled:
            if compile_kwargs:
                raise ValueError(
                    f"compile_kwargs / compile__ parameters {sorted(compile_kwargs)} cannot "
                    "apply: the model function returned a compiled model. Return it "
                    "uncompiled, or compile it there with these settings."
                )
        else:
            model.compile(**{"optimizer": "adam", "loss": self._default_loss, **compile_kwargs})
        return model

    def _builder_arguments(
        self, X: np.ndarray, y: np.ndarray, known: dict[str, Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """What the model function names among ``X``, ``y``, ``n_features_in`` and the
        estimator's own (``n_classes`` / ``n_outputs``); its ``**kwargs`` get ``X`` and ``y``."""
        signature = inspect.signature(self.model)  # type: ignore[arg-type]
        names = signature.parameters
        any_keyword = any(p.kind is p.VAR_KEYWORD for p in names.values())
        unknown = [k for k in kwargs if k not in names]
        if unknown and not any_keyword:
            name = getattr(self.model, "__name__", "the model function")
            raise ValueError(
                f"{sorted(unknown)} are not arguments of {name}{signature}: rename the "
                "model__ parameters, or add the arguments to the function."
            )
        offered = {"X": X, "y": y, "n_features_in": X.shape[1] if X.ndim > 1 else 1, **known}
        taken = {k: v for k, v in offered.items() if k in names and k not in kwargs}
        if any_keyword:
            taken.update({k: offered[k] for k in ("X", "y") if k not in kwargs})
        return taken

    def _fit_model(
        self, X: np.ndarray, y: np.ndarray, known: dict[str, Any], fit_params: dict[str, Any]
    ) -> None:
        self._check_routes()
        kwargs = {"verbose": 0, **(self.fit_kwargs or {}), **self._routed("fit"), **fit_params}
        seed = None
        if self.random_state is not None:
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if not (self.warm_start and hasattr(self, "model_")):
                self.model_ = self._build(X, y, known)
            history = self.model_.fit(X, self._targets_for(self.model_, y), **kwargs)
        self.history_ = history.history

    def _targets_for(self, model: Model, y: np.ndarray) -> np.ndarray:
        return y

    def _outputs(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False, dtype=np.float32, allow_nd=True)
        out = self.model_.predict(X, verbose=0)
        if not isinstance(out, np.ndarray):
            raise TypeError(
                f"{type(self).__name__} needs a network with one tensor output; it returned "
                f"{type(out).__name__}."
            )
        return out


class SKLearnClassifier(ClassifierMixin, _SKLearnBase):
    """A scikit-learn classifier around a torcheras model (Keras 3's
    ``keras.wrappers.SKLearnClassifier``).

    Labels may be any values scikit-learn accepts (strings, integers...): they are encoded as
    ``0 .. n_classes - 1`` (``classes_`` keeps the originals; one-hot rows for a categorical
    loss). The network returns one score per class, logits or probabilities as its loss says
    (or one score for two classes with a binary loss); ``predict_proba`` turns them into
    probabilities, ``predict`` into labels, ``score`` is the accuracy.

    Args:
        model: a function building the network (a ``torch.nn.Module`` or a
            ``torcheras.Model``, compiled or not), or a module instance (copied for each
            fit). The function receives the arguments it names among ``X``, ``y`` (encoded
            labels), ``n_features_in`` and ``n_classes``, plus ``model_kwargs`` and the
            ``model__*`` parameters.
        warm_start: a new ``fit`` continues training the fitted model instead of building one.
        model_kwargs: keyword arguments of the model function.
        fit_kwargs: keyword arguments of ``Model.fit`` (``verbose=0`` unless given); those
            passed to ``fit`` directly win, then the ``fit__*`` parameters.
        compile_kwargs: keyword arguments of ``Model.compile`` for a model returned
            uncompiled (defaults: ``optimizer="adam"``,
            ``loss="sparse_categorical_crossentropy"``, which takes logits).
        random_state: seeds torch's generator for building and fitting (the global state is
            left as it was), so two fits give the same model.
        **kwargs: routed parameters: ``model__<name>``, ``compile__<name>``, ``fit__<name>``.

    Attributes:
        model_: the fitted ``torcheras.Model``.
        history_: ``History.history`` of the last fit.
        classes_: the labels, sorted.
        n_features_in_: the number of features seen by ``fit``.

    Example:
        ```python
        def build(n_features_in, n_classes, hidden=32):
            return torch.nn.Sequential(torch.nn.Linear(n_features_in, hidden),
                                       torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes))

        clf = SKLearnClassifier(build, model__hidden=64, fit__epochs=10, random_state=0)
        clf.fit(X_train, y_train).score(X_test, y_test)
        ```
    """

    _default_loss = "sparse_categorical_crossentropy"
    _multi_output = False

    def fit(self, X: Any, y: Any, **kwargs: Any) -> SKLearnClassifier:
        """Build the model (unless ``warm_start`` and fitted) and train it on ``(X, y)``;
        ``kwargs`` go to ``Model.fit``."""
        X, y = _validate_data(self, X, y, dtype=np.float32, allow_nd=True)
        check_classification_targets(y)
        classes, encoded = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y; got 1 class: {classes[0]!r}."
            )
        if (
            self.warm_start
            and hasattr(self, "classes_")
            and not np.array_equal(classes, self.classes_)
        ):
            raise ValueError(
                f"warm_start: y holds the classes {classes.tolist()}, the fitted model "
                f"{self.classes_.tolist()}; fit again without warm_start."
            )
        self.classes_ = classes
        self._fit_model(X, encoded.astype(np.int64), {"n_classes": len(classes)}, kwargs)
        return self

    def _targets_for(self, model: Model, y: np.ndarray) -> np.ndarray:
        if getattr(model.compiled_loss, "target", None) == "categorical":
            return np.eye(len(self.classes_), dtype=np.float32)[y]
        return y

    def predict_proba(self, X: Any) -> np.ndarray:
        """The probability of each class (columns in the order of ``classes_``)."""
        out = self._outputs(X).astype(np.float32)
        n_classes = len(self.classes_)
        kind = getattr(self.model_.compiled_loss, "output_kind", None)
        if n_classes == 2 and (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
            p = out.reshape(-1)
            if kind == "logits" or (kind != "probabilities" and (p.min() < 0 or p.max() > 1)):
                p = 1.0 / (1.0 + np.exp(-p))
            return np.stack([1.0 - p, p], axis=1)
        if out.ndim != 2 or out.shape[1] != n_classes:
            raise ValueError(
                f"The network gives outputs of shape {out.shape[1:]} per sample for "
                f"{n_classes} classes: build it with n_classes outputs (or one output and a "
                "binary loss for two classes)."
            )
        sums_to_one = out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
        if kind == "probabilities" or (kind != "logits" and sums_to_one):
            return out
        shifted = np.exp(out - out.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each sample, as a label of ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


class SKLearnRegressor(RegressorMixin, _SKLearnBase):
    """A scikit-learn regressor around a torcheras model (Keras 3's
    ``keras.wrappers.SKLearnRegressor``): ``predict`` returns the network's outputs (1-D for
    a 1-D ``y``), ``score`` is R².

    Args:
        model: a function building the network, or a module instance (copied for each fit).
            The function receives the arguments it names among ``X``, ``y``,
            ``n_features_in`` and ``n_outputs`` (1 for a 1-D ``y``), plus ``model_kwargs``
            and the ``model__*`` parameters.
        warm_start: a new ``fit`` continues training the fitted model.
        model_kwargs: keyword arguments of the model function.
        fit_kwargs: keyword arguments of ``Model.fit`` (``verbose=0`` unless given).
        compile_kwargs: keyword arguments of ``Model.compile`` for a model returned
            uncompiled (defaults: ``optimizer="adam"``, ``loss="mse"``).
        random_state: seeds torch's generator for building and fitting.
        **kwargs: routed parameters: ``model__<name>``, ``compile__<name>``, ``fit__<name>``.

    Example:
        ```python
        def build(n_features_in, n_outputs):
            return torch.nn.Linear(n_features_in, n_outputs)

        reg = SKLearnRegressor(build, fit__epochs=20, compile__learning_rate=0.05)
        reg.fit(X, y).predict(X[:5])
        ```
    """

    def fit(self, X: Any, y: Any, **kwargs: Any) -> SKLearnRegressor:
        """Build the model (unless ``warm_start`` and fitted) and train it on ``(X, y)``."""
        X, y = _validate_data(
            self, X, y, dtype=np.float32, allow_nd=True, multi_output=True, y_numeric=True
        )
        y = y.astype(np.float32)
        self._one_column = y.ndim == 1
        self._fit_model(X, y, {"n_outputs": 1 if y.ndim == 1 else y.shape[1]}, kwargs)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The network's outputs as float64 (as scikit-learn's regressors): one value per
        sample for a 1-D ``y``."""
        out = self._outputs(X).astype(np.float64)
        if self._one_column and out.ndim == 2 and out.shape[1] == 1:
            return out[:, 0]
        return out


class SKLearnTransformer(TransformerMixin, _SKLearnBase):
    """A scikit-learn transformer around a torcheras model (Keras 3's
    ``keras.wrappers.SKLearnTransformer``): ``fit`` trains the network on ``(X, y)`` (on
    ``(X, X)`` without ``y``: an autoencoder), ``transform`` returns its outputs.

    Its arguments are :class:`SKLearnRegressor`'s: the model function may name ``X``, ``y``,
    ``n_features_in`` and ``n_outputs``; the default loss is ``"mse"``; the outputs are
    float32, the network's dtype.

    Example:
        ```python
        def build(n_features_in, n_outputs):
            return torch.nn.Linear(n_features_in, n_outputs)

        pipe = make_pipeline(SKLearnTransformer(build, fit__epochs=5), LogisticRegression())
        ```
    """

    def fit(self, X: Any, y: Any = None, **kwargs: Any) -> SKLearnTransformer:
        """Build the model (unless ``warm_start`` and fitted) and train it."""
        if y is None:
            X = _validate_data(self, X, dtype=np.float32, allow_nd=True)
            y = X
        else:
            X, y = _validate_data(
                self, X, y, dtype=np.float32, allow_nd=True, multi_output=True, y_numeric=True
            )
            y = y.astype(np.float32)
        self._fit_model(X, y, {"n_outputs": 1 if y.ndim == 1 else y.shape[1]}, kwargs)
        return self

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]  # the network's dtype
        return tags

    def transform(self, X: Any) -> np.ndarray:
        """The network's outputs for ``X``."""
        return self._outputs(X)
