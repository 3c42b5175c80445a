"""Weak supervision: noisy labelling functions -> probabilistic labels -> an end model.

The workflow Snorkel's users come from. There are no hand labels for training, only three
*labelling functions* (LFs): cheap heuristics that vote 0, 1, or abstain (-1) on each point, and
are sometimes wrong. The true concept is "inside the circle of radius 0.7" on points in the square
[-1, 1]^2:

- ``lf_radius``: votes 1 near the centre (r < 0.6) and 0 far out (r > 0.8), else abstains;
  accurate where it votes, silent on the boundary ring.
- ``lf_x`` and ``lf_y``: vote 1 when ``|x|`` (``|y|``) is below 0.7, else 0: they vote on every
  point, but both are wrong in the corners of the square ``|x|, |y| < 0.7`` outside the circle,
  where together they outvote ``lf_radius``.

Every LF also flips 10% of its votes at random. The votes become labels in two ways:

1. **soft labels** (probabilistic): a tiny label model. Each LF's accuracy is measured on 200
   hand-labelled development points; each vote then moves the log-odds of class 1 by
   ``log(a / (1 - a))`` of its LF (naive Bayes), giving ``P(y = 1)`` per point: a float
   ``(N, 2)`` tensor, trained on with :func:`mtlgraph.graph.losses.cross_entropy_with_probs`
   (a multiclass task's loss picks it for float ``(N, C)`` labels by itself);
2. **hard majority votes**: the class most of the voting LFs say, every LF counting the same;
   ties get the ignore value ``-1`` (masked from the loss, as Snorkel's majority voter abstains).

The same end model (a small MLP) is trained on each, and on the true labels for reference; all
three are scored on held-out points with *true* labels. The soft labels know that ``lf_radius``
is worth more than the two band LFs together, and how sure each vote is; the majority vote
learns the corners wrong. The soft-label model comes close to the one trained on true labels.

Run: ``python tutorials/07_weak_supervision.py``
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer

ABSTAIN = -1
RADIUS = 0.7  # the true concept: inside this circle
BAND = 0.7  # lf_x / lf_y vote 1 inside this band
FLIP = 0.1  # share of each LF's votes that are wrong at random


def make_points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points uniform in [-1, 1]^2 and their true labels (inside the circle)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    return x, (x.norm(dim=1) < RADIUS).long()


def labelling_functions(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The three LFs' votes, ``(N, 3)`` of 0, 1 or -1 (abstain)."""
    g = torch.Generator().manual_seed(seed)
    r = x.norm(dim=1)
    lf_radius = torch.full_like(r, ABSTAIN, dtype=torch.long)
    lf_radius[r < 0.6] = 1
    lf_radius[r > 0.8] = 0
    votes = [lf_radius]
    for column in (0, 1):  # lf_x, lf_y: a band through the centre
        votes.append((x[:, column].abs() < BAND).long())
    votes_t = torch.stack(votes, dim=1)
    flip = (torch.rand(votes_t.shape, generator=g) < FLIP) & (votes_t != ABSTAIN)
    return torch.where(flip, 1 - votes_t, votes_t)  # every LF is also wrong at random


def lf_accuracies(votes: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each LF's accuracy where it votes, measured on a small labelled development set
    (clipped to [0.55, 0.99]: a weight needs a finite log-odds)."""
    acc = [
        float((votes[:, j][votes[:, j] != ABSTAIN] == y[votes[:, j] != ABSTAIN]).float().mean())
        for j in range(votes.shape[1])
    ]
    return torch.tensor(acc).clamp(0.55, 0.99)


def soft_labels(votes: torch.Tensor, accuracy: torch.Tensor, prior: float) -> torch.Tensor:
    """``(N, 2)`` probabilities from the votes: each vote moves the log-odds of class 1 by its
    LF's weight ``log(a / (1 - a))`` (naive Bayes over independent LFs, as a label model
    does); abstains move nothing, so a point without votes keeps the class prior."""
    weight = torch.log(accuracy / (1 - accuracy))
    direction = (votes == 1).float() - (votes == 0).float()  # +1, -1, or 0 for an abstain
    logit = math.log(prior / (1 - prior)) + (direction * weight).sum(1)
    p1 = torch.sigmoid(logit)
    return torch.stack([1 - p1, p1], dim=1)


def majority_votes(votes: torch.Tensor) -> torch.Tensor:
    """Hard labels: the majority of the voting LFs; ties and no votes are -1 (ignored)."""
    n1 = (votes == 1).sum(1)
    n0 = (votes == 0).sum(1)
    hard = (n1 > n0).long()
    hard[n1 == n0] = ABSTAIN
    return hard


def end_model(seed: int) -> MultitaskClassifier:
    """A small MLP for one binary concept, as two logits (softmax)."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    task = Task(
        "inside",
        {"mlp": mlp, "head": nn.Linear(32, 2)},
        [Operation("mlp", [("_input_", "xy")]), Operation("head", ["mlp"])],
    )
    return MultitaskClassifier([task])


def train_and_test(
    labels: torch.Tensor,
    x: torch.Tensor,
    test: DictDataLoader,
    n_epochs: int,
    seed: int,
) -> float:
    """Train the end model on ``labels`` (soft or hard) and return its test accuracy."""
    model = end_model(seed)
    train = DictDataLoader(
        DictDataset("points", "train", {"xy": x}, {"inside": labels}),
        batch_size=64,
        shuffle=True,
        seed=seed,
    )
    Trainer(n_epochs=n_epochs, lr=0.01, progress_bar=False, seed=seed).fit(model, [train])
    return model.score(test)["inside/points/test/accuracy"]


def main(
    n: int = 3000, n_dev: int = 200, n_epochs: int = 30, seed: int = 0, verbose: bool = True
) -> dict:
    """Run the three variants; returns their test accuracies and the labels' own quality."""
    x, y = make_points(n, seed)
    votes = labelling_functions(x, seed + 1)
    x_dev, y_dev = make_points(n_dev, seed + 3)  # a few hand labels, to weigh the LFs
    accuracy = lf_accuracies(labelling_functions(x_dev, seed + 4), y_dev)
    soft = soft_labels(votes, accuracy, prior=float(y_dev.float().mean()))
    hard = majority_votes(votes)
    x_test, y_test = make_points(1000, seed + 2)
    test = DictDataLoader(
        DictDataset("points", "test", {"xy": x_test}, {"inside": y_test}), batch_size=500
    )
    covered = hard != ABSTAIN
    result = {
        "soft": train_and_test(soft, x, test, n_epochs, seed),
        "hard_majority": train_and_test(hard, x, test, n_epochs, seed),
        "true_labels": train_and_test(y, x, test, n_epochs, seed),
        "majority_vote_accuracy": float((hard[covered] == y[covered]).float().mean()),
        "majority_vote_coverage": float(covered.float().mean()),
        "soft_label_accuracy": float((soft.argmax(1) == y).float().mean()),
        "lf_accuracies": accuracy.tolist(),
    }
    if verbose:
        print(
            f"labels: majority votes cover {result['majority_vote_coverage']:.1%} of the points, "
            f"{result['majority_vote_accuracy']:.1%} of them right; the argmax of the soft "
            f"labels is right on {result['soft_label_accuracy']:.1%} of all points"
        )
        for name in ("soft", "hard_majority", "true_labels"):
            print(f"end model trained on {name:>13}: test accuracy {result[name]:.3f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--n-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.n, n_epochs=args.n_epochs, seed=args.seed)
