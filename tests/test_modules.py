"""Built-in config modules and the module and loss registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlgraph import ConfigError, TaskDefinitionError, register_loss, register_module
from mtlgraph.graph.modules import (
    MLP,
    Activation,
    Concat,
    Conv2dStack,
    EmbeddingBag,
    Sum,
    get_module_factory,
    module_types,
)
from mtlgraph.graph.task import get_loss, loss_names


def test_every_issue_module_is_registered() -> None:
    for name in (
        "linear",
        "mlp",
        "embedding_bag",
        "conv2d_stack",
        "identity",
        "concat",
        "sum",
        "dropout",
    ):
        assert name in module_types()
        assert isinstance(get_module_factory(name), type(get_module_factory("mlp"))) or callable(
            get_module_factory(name)
        )


def test_mlp_layers_and_output() -> None:
    mlp = MLP(in_dim=3, hidden=[8, 4], out_dim=2, activation="tanh", dropout=0.1)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear"]
    assert mlp(torch.zeros(5, 3)).shape == (5, 2)


def test_unknown_activation_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown activation 'relu6' \(did you mean 'relu'\?\)"):
        Activation("relu6")


def test_embedding_bag_ignores_padding() -> None:
    bag = EmbeddingBag(10, 3, mode="sum")
    out = bag(torch.tensor([[1, 2, 0, 0], [1, 2, 0, 0], [1, 2, 5, 0]]))
    assert torch.equal(out[0], out[1])
    assert torch.allclose(out[2] - out[0], bag.bag.weight[5])


def test_conv_stack_concat_sum_shapes() -> None:
    assert Conv2dStack(3, [4, 6])(torch.zeros(2, 3, 9, 9)).shape == (2, 6)
    assert Concat()(torch.ones(2, 3), torch.ones(2, 2)).shape == (2, 5)
    assert Sum()(torch.ones(2, 3), 2 * torch.ones(2, 3)).tolist() == [[3.0] * 3] * 2


def test_register_module_rejects_duplicates_and_non_callables() -> None:
    register_module("identity_for_test_modules", nn.Identity)
    assert get_module_factory("identity_for_test_modules") is nn.Identity
    with pytest.raises(ConfigError, match="already registered"):
        register_module("identity_for_test_modules", nn.Identity)
    with pytest.raises(ConfigError, match="is not callable"):
        register_module("nothing_for_test_modules", 3)  # type: ignore[arg-type]


def test_loss_registry() -> None:
    assert {"cross_entropy", "binary_cross_entropy", "mse", "l1", "smooth_l1"} <= set(loss_names())
    register_loss("double_mse_for_test_modules", lambda o, t: 2 * torch.mean((o - t) ** 2))
    loss = get_loss("double_mse_for_test_modules")
    assert loss is not None and float(loss(torch.ones(2), torch.zeros(2))) == 2.0
    with pytest.raises(TaskDefinitionError, match="already registered"):
        register_loss("mse", lambda o, t: o)
