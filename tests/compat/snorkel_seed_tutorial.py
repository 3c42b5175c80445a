# Snorkel's "Multi-Task Learning (MTL) Basics" tutorial (seeds/snorkel-mtl-tutorial.txt), code
# cells as written there, with ONLY the Snorkel import lines changed:
#   from snorkel.classification import X  ->  from mtlgraph.compat.snorkel import X
#   from snorkel.analysis import Scorer   ->  from mtlgraph.compat.snorkel import Scorer
# The "Your Turn" cells are filled in as the tutorial asks. Run by tests/compat/test_snorkel.py.
# ruff: noqa
# fmt: off
import torch

from utils import make_circle_dataset, make_square_dataset

N = 1000  # Data points per dataset
R = 1  # Unit distance

X_train, X_valid, X_test = {}, {}, {}
Y_train, Y_valid, Y_test = {}, {}, {}

circle_train, circle_valid, circle_test = make_circle_dataset(N, R)
(X_train["circle"], Y_train["circle"]) = circle_train
(X_valid["circle"], Y_valid["circle"]) = circle_valid
(X_test["circle"], Y_test["circle"]) = circle_test

square_train, square_valid, square_test = make_square_dataset(N, R)
(X_train["square"], Y_train["square"]) = square_train
(X_valid["square"], Y_valid["square"]) = square_valid
(X_test["square"], Y_test["square"]) = square_test
print(f"Training data shape: {X_train['circle'].shape}")
print(f"Label space: {set(Y_train['circle'])}")

from mtlgraph.compat.snorkel import DictDataset, DictDataLoader

dataloaders = []
for task_name in ["circle", "square"]:
    for split, X, Y in (
        ("train", X_train, Y_train),
        ("valid", X_valid, Y_valid),
        ("test", X_test, Y_test),
    ):
        X_dict = {f"{task_name}_data": torch.FloatTensor(X[task_name])}
        Y_dict = {f"{task_name}_task": torch.LongTensor(Y[task_name])}
        dataset = DictDataset(f"{task_name}Dataset", split, X_dict, Y_dict)
        dataloader = DictDataLoader(dataset, batch_size=32)
        dataloaders.append(dataloader)

import torch.nn as nn
from mtlgraph.compat.snorkel import Operation

# Define a two-layer MLP module and a one-layer prediction "head" module
base_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
head_module = nn.Linear(4, 2)

# The module pool contains all the modules this task uses
module_pool = nn.ModuleDict({"base_mlp": base_mlp, "circle_head_module": head_module})

# "From the input dictionary, pull out 'circle_data' and send it through input_module"
op1 = Operation(
    name="base_mlp", module_name="base_mlp", inputs=[("_input_", "circle_data")]
)

# "Pass the output of op1 (the MLP module) as input to the head_module"
op2 = Operation(
    name="circle_head", module_name="circle_head_module", inputs=["base_mlp"]
)

op_sequence = [op1, op2]

from functools import partial

import torch.nn.functional as F

from mtlgraph.compat.snorkel import Scorer
from mtlgraph.compat.snorkel import Task

circle_task = Task(
    name="circle_task",
    module_pool=module_pool,
    op_sequence=op_sequence,
    loss_func=F.cross_entropy,
    output_func=partial(F.softmax, dim=1),
    scorer=Scorer(metrics=["accuracy"]),
)

square_task = Task(
    name="square_task",
    module_pool=nn.ModuleDict({"base_mlp": base_mlp, "square_head": nn.Linear(4, 2)}),
    op_sequence=[
        Operation("base_mlp", [("_input_", "square_data")]),
        Operation("square_head", ["base_mlp"]),
    ],
)

from mtlgraph.compat.snorkel import MultitaskClassifier

model = MultitaskClassifier([circle_task, square_task])

from mtlgraph.compat.snorkel import Trainer

trainer_config = {"progress_bar": False, "n_epochs": 10, "lr": 0.02}

trainer = Trainer(**trainer_config)
trainer.fit(model, dataloaders)

scores = model.score(dataloaders)
print(scores)

# ---- Your Turn
from utils import make_inv_circle_dataset

# We flip the inequality when generating the labels so that our positive
# class is now _outside_ the circle.
inv_circle_train, inv_circle_valid, inv_circle_test = make_inv_circle_dataset(N, R)
(X_train["inv_circle"], Y_train["inv_circle"]) = inv_circle_train
(X_valid["inv_circle"], Y_valid["inv_circle"]) = inv_circle_valid
(X_test["inv_circle"], Y_test["inv_circle"]) = inv_circle_test

X_dict = {"inv_circle_data": torch.FloatTensor(X_train["inv_circle"])}  # Filled in by you
Y_dict = {"inv_circle_task": torch.LongTensor(Y_train["inv_circle"])}  # Filled in by you
inv_dataset = DictDataset("InvCircleDataset", "train", X_dict, Y_dict)
inv_dataloader = DictDataLoader(dataset=inv_dataset, batch_size=32)

all_dataloaders = dataloaders + [inv_dataloader]

inv_circle_task = Task(
    name="inv_circle_task",  # Filled in by you
    module_pool=nn.ModuleDict({"base_mlp": base_mlp, "inv_circle_head": nn.Linear(4, 2)}),
    op_sequence=[
        Operation("base_mlp", [("_input_", "inv_circle_data")]),
        Operation("inv_circle_head", ["base_mlp"]),
    ],
)

# Add your new task to the list of tasks for creating the MTL model
model = MultitaskClassifier([circle_task, square_task, inv_circle_task])  # Filled in by you

trainer.fit(model, all_dataloaders)
all_scores = model.score(all_dataloaders)
print(all_scores)

assert len(model.tasks) == 3
assert len(model.module_pool) == 4  # 1 shared module plus 3 separate task heads
