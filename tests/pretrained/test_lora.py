"""LoRA adapters on one shared pretrained base: exact deltas and gradients, one copy of the
base, merged export, diagnostics with a frozen base, trainable-only checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtlgraph import CheckpointError, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.gradients import build_layout

pytest.importorskip("transformers")

from mtlgraph.graph.lora import LoRA, checkpoint_context, merged
from mtlgraph.graph.pretrained import HFEncoder


def _tasks(enc: HFEncoder, adapters: dict[str, LoRA], shared: bool = False) -> list[Task]:
    """Tasks ``<t>``: ``adapters[t]`` (named ``<t>_lora``, or ``lora`` when ``shared``) and
    a head."""
    out = []
    for t, adapter in adapters.items():
        name = "lora" if shared else f"{t}_lora"
        ops = [
            Operation(name, [("_input_", "x"), ("_input_", "x_mask")]),
            Operation(f"{t}_head", [name]),
        ]
        out.append(Task(t, {name: adapter, f"{t}_head": nn.Linear(enc.width, 2)}, ops))
    return out


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 25, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[::2, 3:] = False
    return {"x": ids, "x_mask": mask}


def test_the_delta_and_its_gradients_equal_a_hand_written_lora(bert_dir: Path) -> None:
    torch.manual_seed(0)
    enc = HFEncoder(path=str(bert_dir), freeze=True)
    adapter = LoRA(enc, r=2, alpha=4.0, target_modules=["query"])
    adapter.eval()
    with torch.no_grad():
        adapter.B["0"].normal_()
    X = _batch()
    out = adapter(X["x"], X["x_mask"])
    out.sum().backward()
    got = adapter.A["0"].grad.clone()

    # by hand: the query weight replaced by W + (alpha / r) B A, through functional_call
    a = adapter.A["0"].detach().clone().requires_grad_(True)
    name = "model." + adapter.layers[0] + ".weight"
    weight = dict(enc.named_parameters())[name]
    enc.eval()
    ref = torch.func.functional_call(
        enc, {name: weight + 2.0 * adapter.B["0"].detach() @ a}, (X["x"], X["x_mask"])
    )
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, a.grad)
    assert all(p.grad is None for p in enc.parameters())  # frozen: no gradient, no work
    torch.testing.assert_close(merged(adapter)(X["x"], X["x_mask"]), out, atol=1e-5, rtol=0)


def test_two_adapters_share_one_base_and_a_batch_runs_it_once_per_adapter(
    bert_dir: Path,
) -> None:
    enc = HFEncoder(path=str(bert_dir), freeze=True)
    adapters = {t: LoRA(enc, r=2, target_modules=["value"]) for t in ("a", "b")}
    model = MultitaskClassifier(_tasks(enc, adapters))
    base = {id(p) for p in enc.parameters()}
    assert sum(id(p) in base for p in model.parameters()) == len(base)  # once
    calls = []
    enc.register_forward_hook(lambda *args: calls.append(1))
    model(_batch(), ["a", "b"])
    assert len(calls) == 2
    calls.clear()
    model(_batch(), ["a"])
    assert len(calls) == 1


def test_an_unfrozen_base_under_per_task_adapters_is_shared_by_the_gradient_methods(
    bert_dir: Path,
) -> None:
    enc = HFEncoder(path=str(bert_dir))
    adapters = {t: LoRA(enc, r=2, target_modules=["value"]) for t in ("a", "b")}
    model = MultitaskClassifier(_tasks(enc, adapters))
    layout = build_layout(model.tasks, model.plan(["a", "b"]))
    assert {id(p) for p in layout.shared} == {id(p) for p in enc.parameters()}
    assert not any(id(p) in {id(q) for q in enc.parameters()} for p in layout.own["a"])

    frozen = HFEncoder(path=str(bert_dir), freeze=True)
    shared = LoRA(frozen, r=2, target_modules=["value"])
    model = MultitaskClassifier(_tasks(frozen, {"a": shared, "b": shared}, shared=True))
    layout = build_layout(model.tasks, model.plan(["a", "b"]))
    assert {id(p) for p in layout.shared} == {id(p) for p in shared.parameters() if p.requires_grad}


def test_diagnostics_measure_a_shared_adapter_on_a_frozen_base(
    bert_dir: Path, tmp_path: Path
) -> None:
    from mtlgraph import DictDataLoader, DictDataset

    torch.manual_seed(0)
    enc = HFEncoder(path=str(bert_dir), freeze=True)
    shared = LoRA(enc, r=2, target_modules=["query", "value"])
    model = MultitaskClassifier(_tasks(enc, {"a": shared, "b": shared}, shared=True))
    X = _batch(16)
    loaders = [
        DictDataLoader(DictDataset(f"d{t}", "train", X, {t: (X["x"][:, 0] % 2 == i).long()}), 8)
        for i, t in enumerate(("a", "b"))
    ]
    trainer = Trainer(n_epochs=2, lr=0.05, progress_bar=False, diagnostics={"every": 1})
    trainer.fit(model, loaders)
    report = trainer.diagnostics
    pair = report.pair("a", "b", "lora")
    assert pair is not None and -1 <= pair.mean_cosine <= 1
    assert report.affinity_of("a", "b") == report.affinity_of("a", "b")  # a number, not NaN


def test_checkpoint_holds_trainable_weights_and_refuses_another_base(
    bert_dir: Path, tmp_path: Path
) -> None:
    import transformers

    def build(path: Path) -> MultitaskClassifier:
        enc = HFEncoder(path=str(path), freeze=True)
        adapters = {t: LoRA(enc, r=2, target_modules=["value"]) for t in ("a", "b")}
        return MultitaskClassifier(_tasks(enc, adapters))

    model = build(bert_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.save(tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    tensors = [k for k, v in saved.items() if isinstance(v, torch.Tensor)]
    assert sorted(tensors) == sorted(
        f"module_pool.{t}_{w}"
        for t in "ab"
        for w in ("lora.A.0", "lora.B.0", "head.weight", "head.bias")
    )
    again = build(bert_dir)
    again.load(tmp_path / "m.pt")
    X = _batch()
    model.eval(), again.eval()
    torch.testing.assert_close(again(X, ["a"])["a_head"], model(X, ["a"])["a_head"], rtol=0, atol=0)

    other = tmp_path / "other-bert"
    config = transformers.AutoConfig.from_pretrained(bert_dir)
    transformers.AutoModel.from_config(config).save_pretrained(other)  # new random weights
    changed = build(other)
    before = {k: v.clone() for k, v in changed.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(
        CheckpointError, match="trained on the pretrained encoder .* holds other weights"
    ):
        changed.load(tmp_path / "m.pt")
    after = changed.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # all or nothing


def test_gradient_checkpointing_inside_the_base_recomputes_with_the_adapter(
    bert_dir: Path,
) -> None:
    torch.manual_seed(0)
    enc = HFEncoder(path=str(bert_dir), freeze=True)
    adapter = LoRA(enc, r=2, target_modules=["query", "value"])
    with torch.no_grad():
        adapter.B["0"].normal_()
    enc.eval()
    X = _batch()
    adapter(X["x"], X["x_mask"]).pow(2).sum().backward()
    expected = adapter.A["0"].grad.clone()
    adapter.zero_grad()
    enc.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context}
    )
    enc.model.train()  # transformers checkpoints in training mode only
    for m in enc.model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    adapter(X["x"], X["x_mask"]).pow(2).sum().backward()
    torch.testing.assert_close(adapter.A["0"].grad, expected)


def test_a_resnet_takes_lora_on_its_convolutions_and_merges_it(resnet_dir: Path) -> None:
    torch.manual_seed(0)
    enc = HFEncoder(path=str(resnet_dir), freeze=True)
    adapter = LoRA(enc, r=2, target_modules=[r"layer\.0\.convolution"])
    assert adapter.layers and all(n.endswith("layer.0.convolution") for n in adapter.layers)
    with torch.no_grad():
        for b in adapter.B.values():
            b.normal_(std=0.1)
    adapter.eval()
    images = torch.randn(2, 3, 16, 16)
    out = adapter(images)
    assert not torch.allclose(out, enc(images))  # the deltas act
    torch.testing.assert_close(merged(adapter)(images), out, atol=1e-5, rtol=0)
    out.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in adapter.A.values())
