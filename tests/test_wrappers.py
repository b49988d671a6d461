"""The scikit-learn estimators: scikit-learn's own checks, Pipeline, GridSearchCV with two
processes, cross_val_score and clone, each number against scikit-learn's or torch's own."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
import torch
from torch import nn

sklearn = pytest.importorskip("sklearn")
cloudpickle = pytest.importorskip("cloudpickle")  # joblib's pickler for worker processes
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import accuracy_score, r2_score  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from torcheras.wrappers import SKLearnClassifier, SKLearnRegressor, SKLearnTransformer  # noqa: E402

# GridSearchCV(n_jobs=2) sends the estimator to worker processes, which cannot import this
# test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def mlp(n_features_in, n_classes, hidden=16):
    return nn.Sequential(nn.Linear(n_features_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def regression_net(n_features_in, n_outputs, hidden=16):
    return nn.Sequential(nn.Linear(n_features_in, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x[:400].astype(np.float32) / 16, y[:400]


# ---- scikit-learn's own checks -------------------------------------------------------------
# Skipped, and why (also in docs/guide/integrations.md):
EXPECTED_FAILURES = {
    "check_no_attributes_set_in_init": (
        "the routed parameters (model__*, compile__*, fit__*) are **kwargs the check cannot "
        "see in the signature; get_params / set_params / clone keep them (tested below)"
    )
}
# check_array_api_input skips itself (SCIPY_ARRAY_API unset): the networks take numpy arrays.


class Named:
    """A model function whose repr has no address: the checks' test ids are the same in every
    pytest-xdist worker."""

    def __init__(self, fn):
        self.fn = fn
        self.__signature__ = inspect.signature(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return self.fn.__name__


CHECKED = [
    SKLearnClassifier(Named(mlp), fit__epochs=10, compile__learning_rate=0.03, random_state=0),
    SKLearnRegressor(
        Named(regression_net), fit__epochs=10, compile__learning_rate=0.03, random_state=0
    ),
    SKLearnTransformer(Named(regression_net), fit__epochs=3, random_state=0),
]

if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 6):
    from sklearn.utils.estimator_checks import parametrize_with_checks

    @parametrize_with_checks(CHECKED, expected_failed_checks=lambda est: EXPECTED_FAILURES)
    def test_scikit_learn_estimator_checks(estimator, check):
        check(estimator)


# ---- parameters ----------------------------------------------------------------------------
def test_nested_parameters_get_set_and_clone_and_reach_the_model_and_fit(digits):
    x, y = digits
    clf = SKLearnClassifier(mlp, model__hidden=8, fit__epochs=2, fit__batch_size=64)
    params = clf.get_params()
    assert params["model__hidden"] == 8 and params["fit__epochs"] == 2 and params["model"] is mlp
    clf.set_params(model__hidden=24, fit__epochs=3, compile__learning_rate=0.01)
    twin = clone(clf)
    assert twin.get_params() == clf.get_params() and twin is not clf
    twin.fit(x, y)
    assert twin.model_.module[0].out_features == 24  # model__hidden reached the function
    assert len(twin.history_["loss"]) == 3  # fit__epochs reached fit
    assert twin.model_.learning_rate == pytest.approx(0.01)  # compile__ reached compile
    assert not hasattr(clf, "model_")  # the clone was fitted, not the original
    assert twin.n_features_in_ == 64 and list(twin.classes_) == list(range(10))


def test_misrouted_parameters_say_how_to_route_them(digits):
    x, y = digits
    with pytest.raises(ValueError, match=r"'epochs'.*fit__epochs="):
        SKLearnClassifier(mlp, epochs=3).fit(x, y)
    with pytest.raises(ValueError, match=r"\['hiden'\] are not arguments of mlp"):
        SKLearnClassifier(mlp, model__hiden=3).fit(x, y)
    with pytest.raises(ValueError, match="Invalid parameter"):
        SKLearnClassifier(mlp).set_params(epochs=3)  # scikit-learn's own check

    def compiled(n_features_in, n_classes):
        model = torcheras_model(mlp(n_features_in, n_classes))
        model.compile("adam", "sparse_categorical_crossentropy")
        return model

    with pytest.raises(ValueError, match="returned a compiled model"):
        SKLearnClassifier(compiled, compile__learning_rate=0.1).fit(x, y)
    with pytest.raises(TypeError, match="must return a torcheras.Model or a torch.nn.Module"):
        SKLearnClassifier(lambda: "net").fit(x, y)


def torcheras_model(net):
    import torcheras

    return torcheras.Model(net)


# ---- classifier ----------------------------------------------------------------------------
def test_string_labels_probabilities_and_score_match_the_references(digits):
    x, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])[y]  # fmt: skip
    clf = SKLearnClassifier(mlp, fit__epochs=5, compile__learning_rate=0.02, random_state=0)
    clf.fit(x, names)
    assert list(clf.classes_) == sorted(set(names))
    proba = clf.predict_proba(x)
    logits = torch.from_numpy(clf.model_.predict(x, verbose=0))
    np.testing.assert_allclose(proba, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    predicted = clf.predict(x)
    assert set(predicted) <= set(names)
    np.testing.assert_array_equal(predicted, clf.classes_[proba.argmax(1)])
    assert clf.score(x, names) == accuracy_score(names, predicted) > 0.8


@pytest.mark.filterwarnings("ignore:The loss .binary_crossentropy. expects logits")
def test_a_binary_network_with_one_output_and_a_one_hot_loss(digits):
    x, y = digits
    odd = np.where(y % 2 == 1, "odd", "even")
    clf = SKLearnClassifier(mlp, model__hidden=8, fit__epochs=4, random_state=0,
                            compile__loss="binary_crossentropy",
                            compile__learning_rate=0.02)  # fmt: skip
    clf.set_params(model_kwargs={"n_classes": 1})  # one logit
    clf.fit(x, odd)
    p = torch.sigmoid(torch.from_numpy(clf.model_.predict(x, verbose=0))).numpy()[:, 0]
    np.testing.assert_allclose(clf.predict_proba(x), np.stack([1 - p, p], 1), atol=1e-6)
    assert clf.score(x, odd) > 0.75
    # categorical_crossentropy takes one-hot rows: the wrapper encodes the labels so
    onehot = SKLearnClassifier(mlp, fit__epochs=4, compile__loss="categorical_crossentropy",
                               compile__learning_rate=0.02, random_state=0).fit(x, y)  # fmt: skip
    assert onehot.score(x, y) > 0.8


def test_random_state_reproduces_a_fit_and_leaves_the_global_generator_alone(digits):
    x, y = digits
    before = torch.get_rng_state()
    first = SKLearnClassifier(mlp, fit__epochs=2, random_state=3).fit(x, y).predict_proba(x)
    assert torch.equal(torch.get_rng_state(), before)
    second = SKLearnClassifier(mlp, fit__epochs=2, random_state=3).fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(first, second)


def test_warm_start_continues_the_fitted_model_and_an_instance_is_copied(digits):
    x, y = digits
    clf = SKLearnClassifier(mlp, warm_start=True, fit__epochs=2, random_state=0).fit(x, y)
    model, loss = clf.model_, clf.history_["loss"][-1]
    clf.fit(x, y)
    assert clf.model_ is model and clf.history_["loss"][0] < loss  # continued, not rebuilt
    net = mlp(64, 10)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    fitted = SKLearnClassifier(net, fit__epochs=1).fit(x, y)
    assert all(torch.equal(start[k], v) for k, v in net.state_dict().items())  # untouched
    assert fitted.model_.module is not net


# ---- scikit-learn's tools ------------------------------------------------------------------
def test_cross_val_score_equals_a_hand_written_cross_validation(digits):
    x, y = digits
    clf = SKLearnClassifier(mlp, fit__epochs=3, random_state=0)
    scores = cross_val_score(clf, x, y, cv=3)
    expected = [
        accuracy_score(y[test], clone(clf).fit(x[train], y[train]).predict(x[test]))
        for train, test in StratifiedKFold(3).split(x, y)
    ]
    assert scores.tolist() == pytest.approx(expected)


def test_grid_search_with_two_processes_over_a_pipeline(digits):
    x, y = digits
    clf = SKLearnClassifier(mlp, fit__epochs=2, compile__learning_rate=0.02, random_state=0)
    pipe = make_pipeline(StandardScaler(), clf)
    grid = {"sklearnclassifier__model__hidden": [4, 32]}
    search = GridSearchCV(pipe, grid, cv=2, n_jobs=2).fit(x, y)
    assert search.best_params_ == {"sklearnclassifier__model__hidden": 32}
    # the workers' scores are the ones one process computes
    for hidden, score in zip([4, 32], search.cv_results_["mean_test_score"]):
        one = clone(pipe).set_params(sklearnclassifier__model__hidden=hidden)
        assert cross_val_score(one, x, y, cv=2).mean() == pytest.approx(score)
    best = search.best_estimator_[-1]
    assert best.model_.module[0].out_features == 32  # refit with the best parameters
    assert search.score(x, y) == accuracy_score(y, search.predict(x))


# ---- regressor and transformer -------------------------------------------------------------
def test_regressor_predicts_one_column_and_scores_r2(digits):
    x, _ = digits
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 2)).astype(np.float32)
    y = x @ w
    reg = SKLearnRegressor(regression_net, fit__epochs=30, compile__learning_rate=0.01,
                           random_state=0).fit(x, y[:, 0])  # fmt: skip
    predicted = reg.predict(x)
    assert predicted.shape == (400,) and predicted.dtype == np.float64
    np.testing.assert_allclose(predicted, reg.model_.predict(x, verbose=0)[:, 0], atol=0)
    assert reg.score(x, y[:, 0]) == pytest.approx(r2_score(y[:, 0], predicted))
    assert reg.score(x, y[:, 0]) > 0.8
    both = SKLearnRegressor(regression_net, fit__epochs=2).fit(x, y)
    assert both.predict(x).shape == (400, 2) and both.model_.module[-1].out_features == 2


def test_transformer_in_a_pipeline(digits):
    from sklearn.linear_model import LogisticRegression

    x, y = digits

    def encoder(n_features_in, n_outputs):
        return nn.Sequential(nn.Linear(n_features_in, 8), nn.Tanh(), nn.Linear(8, n_outputs))

    transformer = SKLearnTransformer(encoder, fit__epochs=3, random_state=0)
    codes = transformer.fit(x).transform(x)  # no y: trained to reproduce x
    assert codes.shape == (400, 64) and codes.dtype == np.float32
    np.testing.assert_array_equal(codes, transformer.model_.predict(x, verbose=0))
    assert transformer.history_["loss"][-1] < transformer.history_["loss"][0]
    # in a pipeline, fit passes y: the network learns y, the next step reads its outputs
    pipe = make_pipeline(SKLearnTransformer(encoder, fit__epochs=3, random_state=0),
                         LogisticRegression()).fit(x, y)  # fmt: skip
    features = pipe[0].transform(x)
    assert features.shape == (400, 1) and pipe[-1].n_features_in_ == 1
    np.testing.assert_array_equal(pipe.predict(x), pipe[-1].predict(features))


def test_import_torcheras_loads_neither_scikit_learn_nor_the_exporters():
    import subprocess

    code = (
        "import sys, torcheras\n"
        "print(sorted(m for m in ('sklearn', 'onnx', 'onnxscript', 'onnxruntime') "
        "if m in sys.modules))\n"
        "print(torcheras.wrappers.SKLearnClassifier.__name__, 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "SKLearnClassifier True"]


def test_the_guide_snippet_runs(tmp_path, monkeypatch, capsys):
    from conftest import guide_snippet

    monkeypatch.chdir(tmp_path)
    exec(compile(guide_snippet("integrations.md", "scikit-learn"), "integrations.md", "exec"), {})
    best, predicted = capsys.readouterr().out.splitlines()
    assert "'sklearnclassifier__model__hidden'" in best and float(best.split()[-1]) > 0.8
    assert predicted.endswith("(5, 10)")
