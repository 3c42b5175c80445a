"""The ``mlflow`` writer: a run that MLflow's client reads back (params, metrics, artifacts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import MultitaskClassifier, Trainer
from mtlgraph.training.writers import MLFLOW_RUN_FILE, MlflowWriter, attach_mlflow_artifacts

pytest.importorskip("mlflow")


def test_mlflow_run_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    # a local file store (an SQLite one works alike, but its schema set-up takes ~10 s)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    artifacts_root = (tmp_path / "artifacts").as_uri()
    MlflowClient(uri).create_experiment("tiny", artifact_location=artifacts_root)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("trainer: {lr: 0.1}\n")
    writer = MlflowWriter(run_dir, {"experiment": "tiny", "trainer.lr": 0.1}, tracking_uri=uri)
    trainer = Trainer(n_epochs=2, lr=0.1, progress_bar=False, writers=[writer])
    trunk = nn.Linear(2, 4)
    tasks = [make_task("a", trunk), make_task("b", trunk)]
    x = torch.randn(32, 2)
    y = (x[:, 0] > 0).long()
    loaders = [make_loader("d", s, {"x": x}, {"a": y, "b": 1 - y}) for s in ("train", "valid")]
    trainer.fit(MultitaskClassifier(tasks), loaders)
    (run_dir / "scores.json").write_text("{}\n")
    (run_dir / "report.html").write_text("<html></html>\n")
    attach_mlflow_artifacts(run_dir, [run_dir / "report.html"])

    client = MlflowClient(uri)
    run = client.get_run(writer.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params == {"experiment": "tiny", "trainer.lr": "0.1"}
    history = client.get_metric_history(writer.run_id, "model/all/train/loss")
    assert [int(m.step) for m in history] == [int(r["step"]) for r in trainer.history]
    assert [m.value for m in history] == [r["model/all/train/loss"] for r in trainer.history]
    artifacts = {a.path for a in client.list_artifacts(writer.run_id)}
    assert artifacts == {"config.yaml", "scores.json", "report.html"}
    assert (run_dir / MLFLOW_RUN_FILE).is_file()
