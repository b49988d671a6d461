"""compile(strategy="fsdp"): FSDP2 under torchrun (2 and 4 CPU processes over gloo) trains the
same weights as DDP and as one process with the same global batch, with 1/N of the memory.

Three launches serve every test (each costs seconds of start-up): tests/distributed/
fsdp_script.py runs all its cases under 2 ranks (each with "ddp" and "fsdp"), alone (the
reference), and its memory case under 4 ranks.

Tolerances (float32): FSDP against DDP, rtol 1e-5 / atol 1e-6 (the same sums, reduced by a
reduce-scatter instead of an all-reduce); against one process, rtol 1e-4 / atol 1e-5 (1e-4
for the transformer: Adam divides by the root of tiny second moments, which magnifies the
last-bit differences of summing a batch in two halves).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import launch_script

SCRIPT = Path(__file__).parent / "distributed" / "fsdp_script.py"
MLP_BLOCKS = ["module", "module.0", "module.2", "module.4"]

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    # one pytest-xdist worker runs the module (`--dist loadgroup`): `runs` launches once
    pytest.mark.xdist_group("test_fsdp"),
]


def launch(out: Path, *args: str, ranks: int = 2) -> None:
    launch_script(SCRIPT, out, *args, ranks=ranks, timeout=300)


def load(out: Path, ranks: int) -> list[dict]:
    return [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    launch(out / "two")
    launch(out / "one", ranks=1)
    launch(out / "four", "--cases", "memory", ranks=4)
    return {"two": load(out / "two", 2), "one": load(out / "one", 1), "four": load(out / "four", 4)}


SAME_AS_DDP_AND_ONE_PROCESS = [
    "mlp",
    "transformer",
    "policy",
    "subclass",
    "accumulation",
    "accumulation-iterable",
    "clipping",
    "clipnorm",
    "ema",
    "monitor",
    "jit",
]


@pytest.mark.parametrize("case", SAME_AS_DDP_AND_ONE_PROCESS)
def test_fsdp_ends_with_the_weights_and_history_of_ddp_and_of_one_process(runs, case):
    rank0, rank1 = runs["two"]
    fsdp, single = rank0[case, "fsdp"], runs["one"][0][case, "auto"]
    ddp = rank0.get((case, "ddp"), fsdp)  # DDP runs the MLP and the transformer
    assert fsdp["sharded"] and not single["sharded"] and (ddp is fsdp or not ddp["sharded"])
    atol = 1e-4 if case in ("transformer", "policy") else 1e-5
    for key, expected in single["weights"].items():
        assert fsdp["weights"][key].dtype == torch.float32
        torch.testing.assert_close(fsdp["weights"][key], ddp["weights"][key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fsdp["weights"][key], expected, rtol=1e-4, atol=atol)
        assert torch.equal(fsdp["weights"][key], rank1[case, "fsdp"]["weights"][key])
    assert fsdp["history"].keys() == single["history"].keys()
    for key, values in single["history"].items():
        assert fsdp["history"][key] == pytest.approx(ddp["history"][key], rel=1e-5, abs=1e-6)
        assert fsdp["history"][key] == pytest.approx(values, rel=1e-4, abs=1e-5), key
    assert fsdp["history"] == rank1[case, "fsdp"]["history"]  # every callback saw the same
    assert fsdp["evaluate"] == pytest.approx(single["evaluate"], rel=1e-4, abs=1e-5)
    # predict: every rank's part of each batch, put back in input order, on every rank
    torch.testing.assert_close(fsdp["predict"], single["predict"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rank1[case, "fsdp"]["predict"], fsdp["predict"])
    # summary: the whole parameters' counts and the user's class names, as in one process
    assert fsdp["summary"] == single["summary"]


def test_get_weights_of_a_sharded_model_are_the_whole_tensors_on_every_rank(runs):
    """Keras's get_weights gives whole arrays: under FSDP every rank gets the whole tensors
    (no shards) under the names one process has, and set_weights takes them back."""
    for case in ("mlp", "transformer", "subclass"):
        single = runs["one"][0][case, "auto"]["get_weights"]
        for rank in runs["two"]:
            got = rank[case, "fsdp"]["get_weights"]
            assert got.keys() == single.keys()
            for key, value in got.items():
                assert type(value) is torch.Tensor, (case, key, type(value))
                assert value.shape == single[key].shape
                torch.testing.assert_close(value, rank[case, "fsdp"]["weights"][key])
                # set_weights takes them back whole, each rank keeping its part
                after = rank[case, "fsdp"]["after_set_weights"][key]
                torch.testing.assert_close(after, value + 1)


def test_the_blocks_are_the_layers_by_default_a_policy_or_the_model_itself(runs):
    results = runs["two"][0]
    assert results["mlp", "fsdp"]["fsdp_modules"] == MLP_BLOCKS  # each Linear, then the root
    assert results["transformer", "fsdp"]["fsdp_modules"] == ["module", "module.block"]
    assert results["policy", "fsdp"]["fsdp_modules"] == [  # out_proj: MultiheadAttention's
        "module", "module.block.linear1", "module.block.linear2", "module.embed", "module.head",
    ]  # fmt: skip
    assert results["subclass", "fsdp"]["fsdp_modules"] == ["", "hidden", "out"]
    assert results["subclass", "fsdp"]["summary"][0] == 'Model: "Classifier"'


def test_accumulation_reduces_gradients_once_per_optimizer_step(runs):
    results = runs["two"][0]
    # 7 batches an epoch for 2 epochs; 3 blocks with parameters (the root has none)
    assert results["mlp", "fsdp"]["reduce_scatters"] == 3 * 7 * 2
    # groups of 3: 3, 3 and 1 an epoch, the last closed by the known end of the epoch, or,
    # of batches of unknown number, cut short by it (reduced then, once)
    assert results["accumulation", "fsdp"]["reduce_scatters"] == 3 * 3 * 2
    assert results["accumulation-iterable", "fsdp"]["reduce_scatters"] == 3 * 3 * 2


def test_gradient_monitor_logs_the_norms_of_the_whole_parameters(runs):
    fsdp, single = runs["two"][0]["monitor", "fsdp"]["history"], runs["one"][0]["monitor", "auto"]
    for key in ("grad_norm", "grad_norm/0.weight", "weight_norm/4.bias", "update_ratio/2.weight"):
        assert fsdp[key] == pytest.approx(single["history"][key], rel=1e-4), key


def test_mixed_precision_computes_in_bfloat16_through_fsdp_and_keeps_float32_weights(runs):
    results = runs["two"][0]
    fsdp, ddp = results["bf16", "fsdp"], results["bf16", "ddp"]
    assert fsdp["forward_dtypes"] == ["torch.bfloat16"]  # MixedPrecisionPolicy's parameters
    assert ddp["forward_dtypes"] == ["torch.float32"]  # autocast casts inside each op
    for key, expected in ddp["weights"].items():
        assert fsdp["weights"][key].dtype == torch.float32
        # bfloat16 keeps 8 bits of mantissa: both compute the matmuls in it
        torch.testing.assert_close(fsdp["weights"][key], expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_holds_one_nth_of_ddps_parameters_gradients_and_optimizer_state(runs, ranks):
    results = runs["two" if ranks == 2 else "four"]  # each launch runs "ddp" and "fsdp"
    ddp = results[0]["memory", "ddp"]["memory"]
    assert ddp["parameters"] > 50_000 and ddp["optimizer"] == 2 * ddp["parameters"]  # Adam
    for kind, whole in ddp.items():
        held = [r["memory", "fsdp"]["memory"][kind] for r in results]
        for mine in held:  # 64-row layers split evenly: exactly 1/N
            assert mine == pytest.approx(whole / ranks, rel=0.01), (kind, held)
        assert sum(held) == pytest.approx(whole, rel=0.01)  # every byte held once


# ---- one process: no torchrun -------------------------------------------------------------------
def test_a_strategy_that_does_not_exist_is_refused_naming_the_choices():
    import torcheras

    model = torcheras.Model(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'auto', 'ddp', 'fsdp'.*got 'zero3'"):
        model.compile("sgd", "mse", device="cpu", strategy="zero3")


def test_fsdp_settings_are_checked_when_made():
    from torcheras.distributed import FSDP

    with pytest.raises(TypeError, match=r"blocks=\(MyBlock,\).*got 'Linear'"):
        FSDP(blocks="Linear")
    with pytest.raises(ValueError, match="reshard_after_forward.*got 0"):
        FSDP(reshard_after_forward=0)


def test_the_default_blocks_are_transformer_layers_else_the_children_with_parameters():
    from torcheras.distributed import FSDP

    mlp = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    assert FSDP().select(mlp) == [mlp[0], mlp[2]]  # not the ReLU
    stack = torch.nn.Module()
    stack.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    assert FSDP().select(stack) == list(stack.layers)  # into the list, not the list
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2
    )
    assert FSDP().select(encoder) == list(encoder.layers)
    linear = FSDP(blocks=(torch.nn.Linear,)).select(encoder)
    assert len(linear) == 4  # linear1 and linear2 of each layer; never MultiheadAttention's


def test_fsdp_in_one_process_trains_exactly_as_without_a_strategy():
    import numpy as np

    import torcheras

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    weights = {}
    for strategy in ("auto", "fsdp"):
        torch.manual_seed(0)
        model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)))
        model.compile("adam", "mse", device="cpu", strategy=strategy, gradient_accumulation_steps=2)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        assert model._fsdp is None  # nothing to shard over
        weights[strategy] = model.state_dict()
    for key, value in weights["auto"].items():
        assert torch.equal(weights["fsdp"][key], value)
