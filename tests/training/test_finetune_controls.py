"""Fine-tuning controls on any module: the layer resolver, ``layer_lr_decay``,
``gradient_checkpointing``, the ``gradual_unfreezing`` hook (resumed exactly), the throughput
meter, and bf16 autocast with all of them on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlgraph import (
    ConfigError,
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.diagnostics import DiagnosticsConfig, InterferenceMonitor
from mtlgraph.training import GradualUnfreezing
from mtlgraph.training.layers import enable_checkpointing, module_layers


class Encoder(nn.Module):
    """BERT-shaped: embeddings, a ModuleList of blocks, a pooler."""

    def __init__(self, width: int = 8, depth: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(20, width)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(  # type: ignore[assignment]
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout))
            for _ in range(depth)
        )
        self.pooler = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(tokens)
        for block in self.encoder.layer:  # type: ignore[union-attr]
            h = block(h)
        return torch.tanh(self.pooler(h[:, 0]))


def make_model(seed: int = 0, dropout: float = 0.0) -> MultitaskClassifier:
    torch.manual_seed(seed)
    enc = Encoder(dropout=dropout)
    tasks = [
        Task(
            name,
            {"enc": enc, f"{name}_head": nn.Linear(8, 2)},
            [Operation("enc", [("_input_", "tokens")]), Operation(f"{name}_head", ["enc"])],
        )
        for name in ("a", "b")
    ]
    return MultitaskClassifier(tasks)


def loaders(n: int = 48, valid: bool = False) -> list[DictDataLoader]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (n, 5), generator=g)
    Y = {"a": (tokens[:, 0] < 10).long(), "b": (tokens[:, 0] % 2).long()}
    splits = ("train", "valid") if valid else ("train",)
    return [
        DictDataLoader(DictDataset("d", s, {"tokens": tokens}, Y), batch_size=8) for s in splits
    ]


def fit(model: MultitaskClassifier, **config: object) -> Trainer:
    trainer = Trainer(progress_bar=False, **config)  # type: ignore[arg-type]
    trainer.fit(model, loaders())
    return trainer


# ------------------------------------------------------------------ the layers of a module


def test_layers_are_found_bottom_to_top_with_the_embeddings_first() -> None:
    layers, problems = module_layers(Encoder())
    assert problems == []
    assert [layer.name for layer in layers] == [
        "embeddings",
        "encoder.layer.0",
        "encoder.layer.1",
        "encoder.layer.2",
    ]
    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [layer.name for layer in module_layers(mlp)[0]] == ["0", "1", "2"]
    assert module_layers(nn.Linear(2, 2))[0] == []


def test_named_layers_are_patterns_of_one_depth_and_bad_ones_are_named() -> None:
    layers, problems = module_layers(Encoder(), ["embeddings", "encoder.layer.*"])
    assert problems == []
    assert [layer.name for layer in layers][-1] == "encoder.layer.2"
    _, problems = module_layers(Encoder(), ["embeding", "encoder.layer.*", "encoder.layer.1"])
    assert problems[0].startswith("layers[0]: 'embeding' names no submodule (did you mean")
    assert problems[1] == "layers[2]: 'encoder.layer.1' is already a layer (from 'encoder.layer.*')"


# ------------------------------------------------------------------ layer-wise lr decay


def lrs(trainer: Trainer) -> dict[str, float]:
    assert trainer.optimizer is not None
    return {g.get("name", "default"): g["lr"] for g in trainer.optimizer.param_groups}


def test_layer_lr_decay_gives_each_layer_below_the_top_a_decayed_lr() -> None:
    trainer = fit(make_model(), n_epochs=0, lr=1.0, layer_lr_decay={"enc": 0.5})
    assert lrs(trainer) == {
        "default": 1.0,  # heads, the pooler and the top block
        "enc.encoder.layer.1": 0.5,
        "enc.encoder.layer.0": 0.25,
        "enc.embeddings": 0.125,
    }


def test_layer_lr_decay_starts_from_the_modules_param_group_and_follows_the_schedule() -> None:
    trainer = fit(
        make_model(),
        n_epochs=1,
        lr=1.0,
        param_groups={"enc": {"lr": 0.1, "weight_decay": 0.01}},
        layer_lr_decay={"enc": {"decay": 0.5, "layers": ["embeddings", "encoder.layer.*"]}},
        warmup_steps=100,
    )
    assert trainer.optimizer is not None
    groups = {g.get("name", "default"): g for g in trainer.optimizer.param_groups}
    factor = 6 / 100  # warm-up after 6 steps: (step + 1) / warmup of the step's lr
    assert groups["enc"]["lr"] == pytest.approx(0.1 * factor)
    assert groups["enc.encoder.layer.0"]["lr"] == pytest.approx(0.025 * factor)
    assert groups["enc.embeddings"]["weight_decay"] == 0.01
    record = trainer.history[-1]
    assert record["model/all/train/lr/enc.embeddings"] == pytest.approx(0.0125 * factor)


def test_layer_lr_decay_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        Trainer(layer_lr_decay={"enc": 1.5, "head": {"decay": 0.0}})
    assert "layer_lr_decay.enc: must be in (0, 1], got 1.5" in str(e.value)
    assert "layer_lr_decay.head.decay: must be in (0, 1], got 0.0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        fit(
            make_model(),
            layer_lr_decay={"encc": 0.5, "a_head": 0.5, "enc": {"decay": 0.5, "layers": ["x"]}},
        )
    message = str(e.value)
    assert (
        "layer_lr_decay: pattern 'encc' matches no module of the model (did you mean 'enc'?)"
        in message
    )
    assert "layer_lr_decay.a_head: module 'a_head' has no nn.ModuleList or nn.Sequential" in message
    assert "layer_lr_decay.enc.layers[0]: 'x' names no submodule" in message


# ------------------------------------------------------------------ gradient checkpointing


def test_gradient_checkpointing_recomputes_the_layers_and_trains_identically() -> None:
    plain, checkpointed = make_model(dropout=0.2), make_model(dropout=0.2)
    fit(plain, n_epochs=2, lr=0.05)
    fit(checkpointed, n_epochs=2, lr=0.05, gradient_checkpointing=["enc"])
    enc_plain, enc_ckpt = plain.module_pool["enc"], checkpointed.module_pool["enc"]
    for p, q in zip(enc_plain.parameters(), enc_ckpt.parameters(), strict=True):
        assert torch.equal(p, q)  # dropout masks replayed: the same updates, bit for bit
    block = enc_ckpt.encoder.layer[0]  # type: ignore[index]
    assert type(block.__dict__["forward"]).__name__ == "CheckpointedForward"


def test_checkpointed_forward_runs_again_in_backward_and_not_in_eval() -> None:
    runs = []

    class Counted(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            runs.append(self.training)
            return super().forward(x)

    mlp = nn.Sequential(Counted(2, 4), nn.Tanh(), Counted(4, 1))
    assert enable_checkpointing(mlp) == "layers"
    mlp(torch.ones(3, 2)).sum().backward()
    assert len(runs) == 4  # two layers, each forward twice
    mlp.eval()
    mlp(torch.ones(3, 2))
    assert len(runs) == 6
    whole = Counted(2, 2)
    assert enable_checkpointing(whole) == "module"


def test_gradient_checkpointing_refuses_batch_norm_and_unknown_modules() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Embedding(20, 8), nn.BatchNorm1d(5), nn.Flatten(), nn.Linear(40, 2))
    tasks = [
        Task(t, {"bn_trunk": trunk}, [Operation("bn_trunk", [("_input_", "tokens")])])
        for t in ("a", "b")
    ]
    with pytest.raises(ConfigError) as e:
        Trainer(progress_bar=False, gradient_checkpointing=["bn_trunk", "trnk"]).fit(
            MultitaskClassifier(tasks), loaders()
        )
    message = str(e.value)
    assert "gradient_checkpointing: module 'bn_trunk' holds BatchNorm1d, whose running" in message
    assert "gradient_checkpointing: pattern 'trnk' matches no module" in message
    assert "forward" not in trunk[0].__dict__  # nothing changed before the error


# ------------------------------------------------------------------ gradual unfreezing


def snapshot(model: MultitaskClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module_pool["enc"].state_dict().items()}


def test_gradual_unfreezing_thaws_top_down_and_restores_requires_grad() -> None:
    model = make_model()
    before = snapshot(model)
    hook = GradualUnfreezing("enc", every=1, unit="epochs", initial=1)
    trainer = fit(model, n_epochs=2, lr=0.05, hooks=[hook], evaluation_freq=1)
    after = snapshot(model)
    moved = {k.rsplit(".", 1)[0] for k in after if not torch.equal(after[k], before[k])}
    # epoch 1: the top block (and the pooler); epoch 2: the block below as well
    assert moved == {"encoder.layer.2.0", "encoder.layer.1.0", "pooler"}
    assert hook.unfrozen == 3
    keys = [r.get("model/all/train/unfrozen_layers/enc") for r in trainer.history]
    assert keys == [1.0, 2.0]  # the layers that trained in the evaluated epoch
    assert all(p.requires_grad for p in model.parameters())  # as before the fit


def test_gradual_unfreezing_resumes_exactly(tmp_path) -> None:
    def run(n_epochs: int, resume: bool = False) -> MultitaskClassifier:
        model = make_model()
        hook = {"name": "gradual_unfreezing", "module": "enc", "every": 5, "unit": "steps"}
        trainer = Trainer(
            progress_bar=False,
            n_epochs=n_epochs,
            lr=0.05,
            hooks=[hook],
            run_dir=str(tmp_path / ("b" if resume else f"a{n_epochs}")),
            checkpoint_every=1,
        )
        src = tmp_path / "a1" if resume else None
        trainer.fit(model, loaders(), resume_from=src)
        return model

    straight = run(3)
    run(1)  # stopped after epoch 1 (6 steps: one layer thawed at step 5)
    resumed = run(3, resume=True)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_gradual_unfreezing_names_its_problems() -> None:
    with pytest.raises(ConfigError, match="gradual_unfreezing: count must be an integer >= 1"):
        GradualUnfreezing("enc", count=0)
    with pytest.raises(ConfigError, match=r"module 'encc' is no module of the model \(did you"):
        fit(make_model(), hooks=[GradualUnfreezing("encc")])
    with pytest.raises(ConfigError, match="parameters of module 'enc' are not in the optimizer"):
        fit(make_model(), freeze=["enc"], hooks=[GradualUnfreezing("enc")])


# ------------------------------------------------------------------ throughput and memory


def test_throughput_is_logged_with_tokens_of_padded_text_fields() -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 20, (int(k),), generator=g) for k in torch.randint(1, 6, (32,))]
    y = torch.tensor([int(s[0] < 10) for s in seqs])

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 4)

        def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return (self.emb(tokens) * mask[..., None]).sum(1)

    task = Task(
        "t",
        {"bag": Bag(), "head": nn.Linear(4, 2)},
        [
            Operation("bag", [("_input_", "text"), ("_input_", "text_mask")]),
            Operation("head", ["bag"]),
        ],
    )
    ds = DictDataset("d", "train", {"text": seqs}, {"t": y})
    trainer = Trainer(progress_bar=False, throughput=True, n_epochs=1)
    trainer.fit(MultitaskClassifier([task]), [DictDataLoader(ds, batch_size=8)])
    record = trainer.history[-1]
    assert record["model/all/train/examples_per_s"] > 0
    ratio = record["model/all/train/tokens_per_s"] / record["model/all/train/examples_per_s"]
    assert ratio == pytest.approx(sum(len(s) for s in seqs) / 32)  # tokens per example
    assert record["model/all/train/peak_rss_mb"] > 10
    assert "model/all/train/examples_per_s" not in fit(make_model()).history[-1]  # off by default


# ------------------------------------------------------------------ bf16 on the CPU


def test_bf16_autocast_with_decay_checkpointing_and_unfreezing_trains() -> None:
    model = make_model()
    trainer = Trainer(
        progress_bar=False,
        n_epochs=4,
        lr=0.05,
        amp="bf16",
        layer_lr_decay={"enc": 0.8},
        gradient_checkpointing=["enc"],
        hooks=[GradualUnfreezing("enc", initial=2)],
        warmup_fraction=0.1,
        lr_scheduler="linear",
    )
    trainer.fit(model, loaders(valid=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    first, last = trainer.history[0], trainer.history[-1]
    assert last["model/all/train/loss"] < 0.8 * first["model/all/train/loss"]


def test_a_probe_after_a_thaw_measures_the_thawed_layers() -> None:
    model = make_model()
    train = loaders()
    lower = [p for n, p in model.module_pool["enc"].named_parameters() if "pooler" not in n]
    for p in lower:  # only the pooler trains, as under gradual_unfreezing before a thaw
        p.requires_grad_(False)
    monitor = InterferenceMonitor(DiagnosticsConfig(every=1, affinity=True))
    key = "diagnostics/enc/a~b/cosine"
    frozen = monitor.probe(model, train, lr=0.1, step=1)
    for p in lower:  # the thaw
        p.requires_grad_(True)
    thawed = monitor.probe(model, train, lr=0.1, step=1)  # the same rows
    fresh = InterferenceMonitor(DiagnosticsConfig(every=1, affinity=True))
    expected = fresh.probe(model, train, lr=0.1, step=1)
    assert thawed[key] != pytest.approx(frozen[key])
    assert thawed == pytest.approx(expected)  # the layouts were found again
    for p in lower:
        p.requires_grad_(False)
    assert monitor.probe(model, train, lr=0.1, step=1) == pytest.approx(frozen)
    monitor.refresh()  # by hand: the same layouts again
    assert monitor.probe(model, train, lr=0.1, step=1) == pytest.approx(frozen)
