"""Model.export: a torch.export program read back with torch.export.load, and an ONNX file run
in onnxruntime, against the eager model's outputs on batch sizes other than the example's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

import torcheras
from torcheras.export import ExportError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# float32: the exported graph runs the same kernels (torch) or ONNX's (onnxruntime)
TORCH_TOL = {"rtol": 1e-6, "atol": 1e-6}
ONNX_ATOL = 1e-5


def run_onnx(path, *inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))[0]


@pytest.fixture
def trained(blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model, x


def test_torch_export_after_fit_reloads_and_matches_eager(trained, tmp_path):
    model, x = trained
    path = model.export(tmp_path / "model.pt2")  # the example: the batch fit saw last
    assert path == tmp_path / "model.pt2" and model.training  # its mode is left as it was
    program = torch.export.load(path)
    # the network alone: its weights, no optimizer, loss or metric state
    assert set(program.state_dict) == set(model.module.state_dict())
    reloaded = program.module()
    for n in (1, 5, 240):  # fit's example held 2 samples: the batch size is dynamic
        torch.testing.assert_close(
            reloaded(torch.from_numpy(x[:n])),
            torch.from_numpy(model.predict(x[:n], verbose=0)),
            **TORCH_TOL,
        )


def test_onnx_runs_in_onnxruntime_with_another_batch_size(trained, tmp_path):
    model, x = trained
    path = model.export(tmp_path / "model.onnx", format="onnx", input_example=x[:3])
    import onnx

    onnx.checker.check_model(str(path))
    (graph_input,) = onnx.load(str(path)).graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    for n in (1, 7, 240):
        np.testing.assert_allclose(
            run_onnx(path, x[:n]), model.predict(x[:n], verbose=0), rtol=0, atol=ONNX_ATOL
        )


class TwoInputs(torcheras.Model):
    """A subclass with its own forward, two inputs, dropout and batch norm (eval mode counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(3, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.out(self.drop(self.norm(torch.relu(self.a(a) + self.b(b)))))


@pytest.mark.parametrize("format", ["torch", "onnx"])
def test_a_subclass_with_two_inputs_exports_in_eval_mode(format, tmp_path):
    model = TwoInputs()
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    a, b = torch.randn(64, 4), torch.randn(64, 3)
    model.fit((a, b), (a[:, 0] > 0).long(), epochs=1, batch_size=16, verbose=0)
    path = model.export(tmp_path / f"two.{format}", format=format, input_example=(a[:1], b[:1]))
    assert model.training  # still training: the export ran in eval mode and restored it
    a, b = torch.randn(9, 4), torch.randn(9, 3)
    expected = model.predict((a, b), verbose=0)  # predict runs in eval mode: dropout off
    if format == "torch":
        got = torch.export.load(path).module()(a, b)
        torch.testing.assert_close(got, expected, **TORCH_TOL)
    else:
        got = run_onnx(path, a.numpy(), b.numpy())
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=ONNX_ATOL)


def test_keyword_inputs_after_fit_export_from_fits_own_batch(tmp_path):
    model = TwoInputs()  # forward(a, b): fit gives it a dict, by keyword
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    a, b = torch.randn(64, 4), torch.randn(64, 3)
    model.fit({"b": b, "a": a}, (a[:, 0] > 0).long(), epochs=1, batch_size=16, verbose=0)
    reloaded = torch.export.load(model.export(tmp_path / "kw.pt2")).module()
    a, b = torch.randn(6, 4), torch.randn(6, 3)
    torch.testing.assert_close(
        reloaded(a=a, b=b), model.predict({"a": a, "b": b}, verbose=0), **TORCH_TOL
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_is_exported_from_a_cpu_copy_and_stays_there(blobs, tmp_path):
    x, y = blobs
    model = make_model(device="cuda")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    program = torch.export.load(model.export(tmp_path / "gpu.pt2"))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {t.device.type for t in program.state_dict.values()} == {"cpu"}
    got = program.module()(torch.from_numpy(x[:9]))
    # CUDA and CPU kernels sum in different orders: float32, a few ulps apart
    torch.testing.assert_close(got, torch.from_numpy(model.predict(x[:9], verbose=0)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor's value
            return self.linear(x)
        return -self.linear(x)


def test_data_dependent_control_flow_is_named_with_its_line_and_the_fix(tmp_path):
    model = torcheras.Model(DataDependent())
    with pytest.raises(ExportError) as caught:
        model.export(tmp_path / "m.pt2", input_example=torch.randn(2, 4))
    message = str(caught.value)
    assert "data-dependent Python control flow" in message
    assert "test_export.py" in message and "if x.sum() > 0:" in message
    assert "torch.where" in message and "torch.cond" in message
    assert type(caught.value.__cause__).__name__ == "GuardOnDataDependentSymNode"
    assert not (tmp_path / "m.pt2").exists()


class KthValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.kthvalue(self.linear(x), 2, dim=1).values  # no ONNX translation


def test_an_operator_onnx_cannot_translate_is_named_with_its_line(tmp_path):
    model = torcheras.Model(KthValue())
    x = torch.randn(2, 4)
    with pytest.raises(ExportError, match=r"no ONNX translation for the operator aten\.kthvalue"):
        model.export(tmp_path / "m.onnx", format="onnx", input_example=x)
    try:
        model.export(tmp_path / "m.onnx", format="onnx", input_example=x)
    except ExportError as error:
        assert "test_export.py" in str(error) and "torch.kthvalue" in str(error)
        assert "format='torch'" in str(error) and error.__cause__ is not None
    # the torch format takes it: any aten operator
    reloaded = torch.export.load(model.export(tmp_path / "m.pt2", input_example=x)).module()
    x = torch.randn(5, 4)
    torch.testing.assert_close(reloaded(x), model.module(x), **TORCH_TOL)


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x).reshape(2, -1)  # the batch size written in


def test_a_network_fixing_the_batch_size_says_so_and_exports_with_a_fixed_batch(tmp_path):
    model = torcheras.Model(FixedBatch())
    x = torch.randn(2, 4)
    with pytest.raises(ExportError, match="fixes the batch size") as caught:
        model.export(tmp_path / "m.pt2", input_example=x)
    assert "dynamic_batch=False" in str(caught.value)
    program = torch.export.load(model.export(tmp_path / "m.pt2", input_example=x,
                                             dynamic_batch=False))  # fmt: skip
    torch.testing.assert_close(program.module()(x), model.module(x), **TORCH_TOL)


def test_bad_arguments_say_what_to_pass(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="input_example=x"):
        model.export(tmp_path / "m.pt2")  # never fitted: no example batch
    with pytest.raises(ValueError, match="`format` must be 'torch' or 'onnx'; got 'tflite'"):
        model.export(tmp_path / "m.tflite", format="tflite", input_example=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"ends in \.onnx but format='torch': pass format='onnx'"):
        model.export(tmp_path / "m.onnx", input_example=torch.zeros(2, 8))
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="at least one tensor"):
        model.export(tmp_path / "m.pt2", input_example=[1, 2])


def test_the_guide_snippet_runs(tmp_path, monkeypatch, capsys):
    from conftest import guide_snippet

    monkeypatch.chdir(tmp_path)
    snippet = guide_snippet("integrations.md", "Export (torch.export, ONNX)")
    exec(compile(snippet, "integrations.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == ["torch.Size([5, 3])", "True"]
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "model.onnx").is_file()
