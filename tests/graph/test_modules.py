"""Built-in config modules and the module and loss registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlgraph import ConfigError
from mtlgraph.exceptions import UnknownNameError
from mtlgraph.graph.losses import LOSSES, regression_loss
from mtlgraph.graph.modules import (
    ACTIVATIONS,
    MLP,
    MODULES,
    Activation,
    Concat,
    Conv2dStack,
    EmbeddingBag,
    Sum,
)


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
        assert name in MODULES.names()
        assert callable(MODULES.get(name))


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
    stage = Conv2dStack(3, [4, 6], batch_norm=True, pool=False, global_pool=False)
    kinds = [type(m).__name__ for m in stage.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU"]
    assert stage(torch.zeros(2, 3, 9, 9)).shape == (2, 6, 9, 9)
    assert Conv2dStack(3, [4], global_pool=False)(torch.zeros(2, 3, 9, 9)).shape == (2, 4, 5, 5)
    assert Concat()(torch.ones(2, 3), torch.ones(2, 2)).shape == (2, 5)
    assert Sum()(torch.ones(2, 3), 2 * torch.ones(2, 3)).tolist() == [[3.0] * 3] * 2


def test_register_module_same_object_is_a_noop_another_needs_override() -> None:
    MODULES.register("identity_for_test_modules", nn.Identity)
    try:
        assert MODULES.get("identity_for_test_modules") is nn.Identity
        MODULES.register("identity_for_test_modules", nn.Identity)  # a re-run cell: fine
        with pytest.raises(ConfigError, match="already registered.*override=True"):
            MODULES.register("identity_for_test_modules", nn.ReLU)
        MODULES.register("identity_for_test_modules", nn.ReLU, override=True)
        assert MODULES.get("identity_for_test_modules") is nn.ReLU
    finally:
        MODULES.unregister("identity_for_test_modules")
    assert "identity_for_test_modules" not in MODULES.names()
    with pytest.raises(ConfigError, match="is not callable"):
        MODULES.register("nothing_for_test_modules", 3)  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match="unknown module type 'mpl' \\(did you mean 'mlp'"):
        MODULES.get("mpl")


def test_activations_are_a_registry() -> None:
    ACTIVATIONS.register("hardtanh_for_test_modules", nn.Hardtanh)
    try:
        assert type(Activation("hardtanh_for_test_modules").fn) is nn.Hardtanh
        assert [type(m).__name__ for m in MLP(2, [3], activation="hardtanh_for_test_modules")] == [
            "Linear",
            "Hardtanh",
        ]
    finally:
        ACTIVATIONS.unregister("hardtanh_for_test_modules")
    with pytest.raises(ConfigError, match="unknown activation 'hardtanh_for_test_modules'"):
        Activation("hardtanh_for_test_modules")


def test_loss_registry() -> None:
    assert {"cross_entropy", "binary_cross_entropy", "mse", "l1", "smooth_l1"} <= set(
        LOSSES.names()
    )

    def double_mse(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 2 * torch.mean((o - t) ** 2)

    LOSSES.register("double_mse_for_test_modules", double_mse)
    try:
        loss = LOSSES.get("double_mse_for_test_modules")
        assert float(loss(torch.ones(2), torch.zeros(2))) == 2.0
        assert LOSSES.register("double_mse_for_test_modules", double_mse) is double_mse  # no-op
    finally:
        LOSSES.unregister("double_mse_for_test_modules")
    with pytest.raises(ConfigError, match="loss 'mse' is already registered"):
        LOSSES.register("mse", lambda o, t: o)
    with pytest.raises(ConfigError, match="unknown loss 'msee' \\(did you mean 'mse'\\?\\)"):
        LOSSES.get("msee")
    assert LOSSES.get("mse") is regression_loss
