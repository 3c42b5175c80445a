"""Fine-tuning controls on Hugging Face encoders and LoRA adapters: the layers of a BERT,
its own gradient checkpointing (exact, also through adapters) and layer-wise lr decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from mtlgraph import MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.graph.lora import LoRA
from mtlgraph.graph.pretrained import HFEncoder
from mtlgraph.training.layers import enable_checkpointing, module_layers

BERT = {
    "model_type": "bert",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "hidden_dropout_prob": 0.1,
}


def bert(seed: int = 0, freeze: bool = False) -> HFEncoder:
    torch.manual_seed(seed)
    return HFEncoder(config=BERT, pooling="cls", freeze=freeze)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 4:] = False
    return ids, mask


def test_bert_layers_are_its_embeddings_then_its_blocks() -> None:
    enc = bert()
    layers, problems = module_layers(enc)
    assert problems == []
    assert [layer.name for layer in layers] == [
        "model.embeddings",
        "model.encoder.layer.0",
        "model.encoder.layer.1",
        "model.encoder.layer.2",
    ]
    named, _ = module_layers(enc, ["model.embeddings", "model.encoder.layer.*"])
    assert [[id(p) for p in layer.params] for layer in named] == [
        [id(p) for p in layer.params] for layer in layers
    ]


def grads(module: nn.Module, run: nn.Module) -> list[torch.Tensor]:
    ids, mask = batch()
    torch.manual_seed(5)  # the same dropout masks in both runs
    run.train()
    run(ids, mask).pow(2).sum().backward()
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_hf_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain, ckpt = bert(), bert()
    assert enable_checkpointing(ckpt) == "hf"
    assert ckpt.model.is_activation_checkpointing
    for g, h in zip(grads(plain, plain), grads(ckpt, ckpt), strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=1e-6)


def test_checkpointing_through_lora_adapters_keeps_the_adapters_gradients() -> None:
    def adapter(checkpointed: bool) -> LoRA:
        base = bert(freeze=True)
        if checkpointed:
            enable_checkpointing(base)
        torch.manual_seed(3)
        lora = LoRA(base, r=2, target_modules=["query", "value"])
        with torch.no_grad():
            for b in lora.B.values():
                b.normal_()  # a trained adapter: its delta is not zero
        return lora

    plain, ckpt = adapter(False), adapter(True)
    g_plain, g_ckpt = grads(plain, plain), grads(ckpt, ckpt)
    assert len(g_plain) == len(g_ckpt) == 2 * 2 * 3  # A and B of 2 layers x 3 blocks
    for g, h in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_layer_lr_decay_on_a_bert_in_the_graph() -> None:
    enc = bert()
    tasks = [
        Task(
            name,
            {"enc": enc, f"{name}_head": nn.Linear(16, 2)},
            [
                Operation("enc", [("_input_", "ids"), ("_input_", "ids_mask")]),
                Operation(f"{name}_head", ["enc"]),
            ],
        )
        for name in ("a", "b")
    ]
    from mtlgraph.training.optim import model_param_groups

    model = MultitaskClassifier(tasks)
    groups, problems = model_param_groups(model, {}, (), {"enc": 0.9}, 1e-3)
    assert problems == []
    lrs = {g.get("name", "default"): g.get("lr") for g in groups}
    assert lrs["enc.model.embeddings"] == pytest.approx(1e-3 * 0.9**3)
    assert lrs["enc.model.encoder.layer.1"] == pytest.approx(1e-3 * 0.9)
    assert "enc.model.encoder.layer.2" not in lrs  # the top block trains at lr, in the default
    enc.requires_grad_(False)  # a frozen encoder: its lr cannot decay
    problems = model_param_groups(model, {}, (), {"enc": 0.9}, 1e-3)[1]
    assert problems == [
        "layer_lr_decay.enc: the layers of module 'enc' do not train (a frozen encoder: freeze: "
        "true); decay the lr of a module that trains"
    ]


def test_a_bert_fine_tunes_with_every_control_at_once() -> None:
    """bf16 autocast on the CPU, its own gradient checkpointing, layer-wise lr decay and
    gradual unfreezing together: the unfrozen top trains, the frozen bottom does not."""
    from mtlgraph import DictDataLoader, DictDataset
    from mtlgraph.training import GradualUnfreezing

    enc = bert()
    task = Task(
        "a",
        {"enc": enc, "a_head": nn.Linear(16, 2)},
        [
            Operation("enc", [("_input_", "text"), ("_input_", "text_mask")]),
            Operation("a_head", ["enc"]),
        ],
    )
    ids, mask = batch()
    data = DictDataset("d", "train", {"text": ids.repeat(4, 1), "text_mask": mask.repeat(4, 1)},
                       {"a": (ids[:, 1] % 2).repeat(4)})  # fmt: skip
    embeddings = enc.model.embeddings.word_embeddings.weight.detach().clone()
    top = enc.model.encoder.layer[2].output.dense.weight.detach().clone()
    trainer = Trainer(
        n_epochs=1, lr=1e-2, amp="bf16", gradient_checkpointing=["enc"], throughput=True,
        layer_lr_decay={"enc": 0.5}, hooks=[GradualUnfreezing("enc", initial=1)],
        progress_bar=False,
    )  # fmt: skip
    trainer.fit(MultitaskClassifier([task]), [DictDataLoader(data, batch_size=8)])
    assert enc.model.is_activation_checkpointing
    assert torch.equal(enc.model.embeddings.word_embeddings.weight, embeddings)
    assert not torch.equal(enc.model.encoder.layer[2].output.dense.weight, top)
    record = trainer.history[-1]
    assert record["model/all/train/unfrozen_layers/enc"] == 1
    tokens_per_example = (
        record["model/all/train/tokens_per_s"] / record["model/all/train/examples_per_s"]
    )
    assert tokens_per_example == pytest.approx(float(mask.sum()) / len(mask))  # the real tokens
