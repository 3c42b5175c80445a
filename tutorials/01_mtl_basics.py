"""Multi-task learning basics: the Snorkel MTL tutorial, with mtlgraph.

Two tasks (is a 2-D point inside the unit circle? inside the unit square?) share a two-layer MLP
trunk named ``base_mlp`` and have their own linear heads. Each task has its own dataset; the
Trainer mixes their batches. Then ("your turn") a third task, ``inv_circle_task``, joins the
model through the same shared trunk.

Run: ``python tutorials/01_mtl_basics.py``
"""

from __future__ import annotations

import argparse
from functools import partial
from pprint import pprint

import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Scorer,
    Task,
    Trainer,
)
from mtlgraph.data.synthetic import (
    make_circle_dataset,
    make_inv_circle_dataset,
    make_square_dataset,
)


def make_loaders(
    task_name: str, splits: tuple, dataset_name: str, batch_size: int = 32
) -> list[DictDataLoader]:
    """One loader per split; the label name is the task name, the field ``<task>_data``."""
    loaders = []
    for split, (X, Y) in zip(("train", "valid", "test"), splits, strict=True):
        X_dict = {f"{task_name}_data": torch.FloatTensor(X)}
        Y_dict = {f"{task_name}_task": torch.LongTensor(Y)}
        dataset = DictDataset(dataset_name, split, X_dict, Y_dict)
        loaders.append(DictDataLoader(dataset, batch_size=batch_size))
    return loaders


def main(N: int = 1000, n_epochs: int = 10, lr: float = 0.02, seed: int = 0) -> tuple:
    """Run the tutorial; returns the final model and its score dictionary."""
    torch.manual_seed(seed)  # module initialisation of this script
    R = 1  # Unit distance

    # --- Make DataLoaders: one per split of each task.
    dataloaders = []
    dataloaders += make_loaders("circle", make_circle_dataset(N, R, seed=seed), "circleDataset")
    dataloaders += make_loaders("square", make_square_dataset(N, R, seed=seed), "squareDataset")

    # --- Define the circle task, verbosely.
    base_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
    head_module = nn.Linear(4, 2)
    module_pool = nn.ModuleDict({"base_mlp": base_mlp, "circle_head_module": head_module})
    op1 = Operation(name="base_mlp", module_name="base_mlp", inputs=[("_input_", "circle_data")])
    op2 = Operation(name="circle_head", module_name="circle_head_module", inputs=["base_mlp"])
    circle_task = Task(
        name="circle_task",
        module_pool=module_pool,
        op_sequence=[op1, op2],
        loss_func=F.cross_entropy,
        output_func=partial(F.softmax, dim=1),
        scorer=Scorer(metrics=["accuracy"]),
    )

    # --- Again, but faster: defaults are cross-entropy, softmax and accuracy.
    square_task = Task(
        name="square_task",
        module_pool=nn.ModuleDict({"base_mlp": base_mlp, "square_head": nn.Linear(4, 2)}),
        op_sequence=[
            Operation("base_mlp", [("_input_", "square_data")]),
            Operation("square_head", ["base_mlp"]),
        ],
    )

    # --- Your turn: the inv_circle task shares base_mlp and has its own head.
    inv_loaders = make_loaders(
        "inv_circle", make_inv_circle_dataset(N, R, seed=seed), "InvCircleDataset"
    )
    all_dataloaders = dataloaders + inv_loaders
    inv_circle_task = Task(
        name="inv_circle_task",
        module_pool=nn.ModuleDict({"base_mlp": base_mlp, "inv_circle_head": nn.Linear(4, 2)}),
        op_sequence=[
            Operation("base_mlp", [("_input_", "inv_circle_data")]),
            Operation("inv_circle_head", ["base_mlp"]),
        ],
    )

    model = MultitaskClassifier([circle_task, square_task, inv_circle_task])
    trainer_config = {"progress_bar": False, "n_epochs": n_epochs, "lr": lr, "seed": seed}
    trainer = Trainer(**trainer_config)
    trainer.fit(model, all_dataloaders)

    assert len(model.tasks) == 3
    assert len(model.module_pool) == 4  # 1 shared module plus 3 separate task heads
    return model, model.score(all_dataloaders)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="data points per dataset")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, scores = main(N=args.n, n_epochs=args.epochs, seed=args.seed)
    pprint(scores)
