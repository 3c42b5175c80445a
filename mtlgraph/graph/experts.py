"""Standard multi-task architectures as graph blocks: MMoE and DSelect-k gates
(:class:`Gate`), CGC / PLE (experts and gates stacked), cross-stitch (:class:`CrossStitch`),
MTAN (:class:`MTANAttention` over a shared trunk's stages).

Each architecture is a few module types that a task's operations wire together explicitly, so
``mtlgraph check`` shows every task's own path. Formulas and YAML: ``docs/architectures.md``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from mtlgraph.exceptions import ArgumentCheck, ConfigError
from mtlgraph.graph.activations import ACTIVATIONS

__all__ = ["CrossStitch", "Experts", "Gate", "GateKind", "MTANAttention", "smooth_step"]

GateKind = Literal["softmax", "dselect_k"]
GATE_KINDS: tuple[str, ...] = ("softmax", "dselect_k")


def _sized_check(who: str, in_dim: object, n_experts: object) -> ArgumentCheck:
    """The argument check of a block on ``(B, in_dim)`` inputs over ``n_experts`` experts."""
    check = ArgumentCheck(who)
    check.integer("in_dim", in_dim)
    check.integer("n_experts", n_experts)
    return check


class Experts(nn.Module):
    """``n_experts`` independent MLPs on one input, outputs stacked: ``(B, n_experts, hidden[-1])``.

    Args:
        in_dim: Input features (the input is ``(B, in_dim)``).
        n_experts: Number of experts (>= 1).
        hidden: Width of each layer of every expert; the last is the expert output size ``d``.
        activation: One of :data:`~mtlgraph.graph.activations.ACTIVATIONS`.
        dropout: Dropout probability after each activation (0 = none).

    Raises:
        ConfigError: Every malformed argument at once.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.experts import Experts
        >>> Experts(in_dim=4, n_experts=3, hidden=[8, 6])(torch.zeros(2, 4)).shape
        torch.Size([2, 3, 6])
    """

    def __init__(
        self,
        in_dim: int,
        n_experts: int,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check = _sized_check("experts", in_dim, n_experts)
        listed = isinstance(hidden, (list, tuple)) and bool(hidden)
        check.require(listed, f"hidden must be a non-empty list of widths, got {hidden!r}")
        for i, h in enumerate(hidden if listed else []):
            check.integer(f"hidden[{i}]", h)
        check.number("dropout", dropout, "in [0, 1)", lambda v: 0 <= v < 1)
        check.done()
        self.n_experts = n_experts
        self.out_dim = hidden[-1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        width = in_dim
        for h in hidden:
            bound = 1.0 / math.sqrt(width)  # nn.Linear's default initialisation, per expert
            w = torch.empty(n_experts, width, h).uniform_(-bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(n_experts, h).uniform_(-bound, bound)))
            width = h
        self.act = ACTIVATIONS.build(activation, "activation")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,eio->beo", x, self.weights[0]) + self.biases[0]
        h = self.dropout(self.act(h))
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            h = self.dropout(self.act(torch.einsum("bei,eio->beo", h, w) + b))
        return h

    def extra_repr(self) -> str:
        widths = [int(w.shape[2]) for w in self.weights]
        return f"n_experts={self.n_experts}, in_dim={self.weights[0].shape[1]}, hidden={widths}"


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's smooth step: 0 below ``-gamma/2``, 1 above ``gamma/2``, a cubic in between.

    ``S(t) = -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` on ``[-gamma/2, gamma/2]``; it is
    continuously differentiable and reaches exact 0 and 1, so a trained gate can select exactly.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.experts import smooth_step
        >>> smooth_step(torch.tensor([-1.0, 0.0, 0.25, 1.0]), gamma=1.0).tolist()
        [0.0, 0.5, 0.84375, 1.0]
    """
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, cubic))


class _AddRegularizerGradient(torch.autograd.Function):
    """Identity on ``out``; backward also sends gradient 1 into the scalar ``penalty`` (so
    DSelect-k's entropy joins every backward pass through the gate, without a loss term)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


class Gate(nn.Module):
    """One task's gate: mixes stacked experts with per-example weights that sum to 1.

    ``gate(x, E_1, ..., E_m)``: selector input ``x`` ``(B, in_dim)`` and :class:`Experts` outputs
    ``(B, n_j, d)`` mixed into ``(B, d)``; MMoE's softmax gate or DSelect-k's ``k`` smooth binary
    selectors (``docs/architectures.md``).

    Args:
        in_dim: Features of the selector input ``x``.
        n_experts: Total number of experts over all stacks passed to ``forward``.
        kind: ``"softmax"`` or ``"dselect_k"``.
        k: DSelect-k: number of selectors (at most ``k`` experts are used per example).
        gamma: DSelect-k: width of the smooth step's cubic part (> 0).
        entropy: DSelect-k: weight of the entropy regulariser (>= 0; 0 = off).

    Raises:
        ConfigError: Every malformed argument at once.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.experts import Experts, Gate
        >>> x = torch.randn(5, 4)
        >>> shared, own = Experts(4, 3, [8])(x), Experts(4, 1, [8])(x)
        >>> gate = Gate(in_dim=4, n_experts=4, kind="dselect_k", k=2)
        >>> gate(x, shared, own).shape
        torch.Size([5, 8])
        >>> torch.allclose(gate.weights(x).sum(dim=1), torch.ones(5))
        True
    """

    bits: torch.Tensor  # DSelect-k buffers: (2^m, m) binary codes; (2^m, n_experts) code -> expert
    owner: torch.Tensor

    def __init__(
        self,
        in_dim: int,
        n_experts: int,
        kind: GateKind = "softmax",
        k: int = 2,
        gamma: float = 1.0,
        entropy: float = 0.0,
    ) -> None:
        super().__init__()
        check = _sized_check("gate", in_dim, n_experts)
        check.choice("kind", kind, GATE_KINDS)
        check.integer("k", k)
        if kind == "dselect_k" and isinstance(k, int) and isinstance(n_experts, int):
            check.require(
                k <= n_experts,
                f"k={k} selectors for n_experts={n_experts} experts: each selector picks one "
                f"expert, so k must be <= n_experts (set k: {n_experts} or fewer)",
            )
        check.number("gamma", gamma, "> 0", lambda v: v > 0)
        check.number("entropy", entropy, ">= 0", lambda v: v >= 0)
        check.require(
            kind != "softmax" or not entropy,
            "entropy regularises DSelect-k selectors; set kind: dselect_k",
        )
        check.done()
        self.n_experts, self.kind, self.in_dim = n_experts, kind, in_dim
        self.k, self.gamma, self.entropy = k, float(gamma), float(entropy)
        if kind == "softmax":
            self.logits = nn.Linear(in_dim, n_experts)
            return
        m = max(1, math.ceil(math.log2(n_experts)))
        self.selectors = nn.Linear(in_dim, k * m)  # z_i(x), i = 1..k, each in R^m
        bound = self.gamma / 100  # the paper's start: every S(z) near 1/2, in the cubic part
        nn.init.uniform_(self.selectors.weight, -bound, bound)
        nn.init.uniform_(self.selectors.bias, -bound, bound)
        self.mix = nn.Linear(in_dim, k)  # alpha(x): how the k selectors are combined
        codes = torch.arange(2**m)
        bits = (codes[:, None] >> torch.arange(m - 1, -1, -1)) & 1  # (2^m, m), high bit first
        owner = nn.functional.one_hot(codes % n_experts, n_experts).float()  # spare codes wrap
        self.register_buffer("bits", bits.float(), persistent=False)
        self.register_buffer("owner", owner, persistent=False)

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mixture weights ``(B, n_experts)`` and DSelect-k's selections ``(B, k, 2^m)``."""
        if self.kind == "softmax":
            return torch.softmax(self.logits(x), dim=-1), None
        s = smooth_step(
            self.selectors(x).unflatten(-1, (self.k, 1, -1)), self.gamma
        )  # (B, k, 1, m)
        r = torch.where(self.bits > 0, s, 1.0 - s).prod(dim=-1)  # (B, k, 2^m)
        alpha = torch.softmax(self.mix(x), dim=-1)
        return torch.einsum("bk,bkc,ce->be", alpha, r, self.owner), r

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture weights ``(B, n_experts)`` for selector input ``x``; each row sums to 1."""
        return self._mix(x)[0]

    def forward(self, x: torch.Tensor, *experts: torch.Tensor) -> torch.Tensor:
        if not experts:
            raise ConfigError(
                [
                    "gate got only its selector input; pass the expert stacks after it "
                    "(inputs: [selector, experts, ...])"
                ]
            )
        got = [tuple(e.shape) for e in experts]
        if any(e.ndim != 3 for e in experts) or len({g[2:] for g in got}) > 1:
            raise ConfigError(
                [
                    f"gate expects expert stacks (B, n, d) of one width d, got shapes {got}; "
                    "give the experts the same last hidden width"
                ]
            )
        stacked = experts[0] if len(experts) == 1 else torch.cat(experts, dim=1)
        if stacked.shape[1] != self.n_experts:
            raise ConfigError(
                [
                    f"gate has n_experts={self.n_experts} but its expert stacks hold "
                    f"{stacked.shape[1]} experts (shapes {got}); set n_experts: "
                    f"{stacked.shape[1]}, the sum of the stacks' expert counts"
                ]
            )
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ConfigError(
                [
                    f"gate has in_dim={self.in_dim} but its selector input has shape "
                    f"{tuple(x.shape)}; set in_dim: {x.shape[-1]}, the selector's features"
                ]
            )
        w, r = self._mix(x)
        out = torch.einsum("be,bed->bd", w, stacked)
        if r is not None and self.entropy > 0 and self.training and torch.is_grad_enabled():
            h = -(r * torch.log(r.clamp_min(1e-12))).sum(dim=-1)  # (B, k) entropy per selector
            out = _AddRegularizerGradient.apply(out, self.entropy * h.sum(dim=1).mean())
        return out

    def extra_repr(self) -> str:
        dselect = f", k={self.k}, gamma={self.gamma}, entropy={self.entropy}"
        return f"n_experts={self.n_experts}, kind={self.kind}" + dselect * (self.kind != "softmax")


class CrossStitch(nn.Module):
    """A cross-stitch unit: ``K`` task columns in, ``K`` learned linear mixes of them out.

    ``out_i = sum_j alpha_ij in_j``, ``alpha`` ``(K, K)`` (or ``(dim, K, K)``) starting at
    ``self_weight`` on the diagonal; task ``i`` reads its column as ``(op_name, i)``.

    Args:
        n_columns: Number of task columns ``K`` (>= 2).
        dim: When given, the features of each column, and every feature gets its own ``alpha``.
        self_weight: Initial weight of a column on itself, in ``[0, 1]``.

    Raises:
        ConfigError: Every malformed argument at once.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.experts import CrossStitch
        >>> a, b = CrossStitch(n_columns=2)(torch.ones(1, 3), torch.zeros(1, 3))
        >>> [round(v, 2) for v in a[0].tolist()], [round(v, 2) for v in b[0].tolist()]
        ([0.9, 0.9, 0.9], [0.1, 0.1, 0.1])
    """

    def __init__(self, n_columns: int, dim: int | None = None, self_weight: float = 0.9) -> None:
        super().__init__()
        check = ArgumentCheck("cross_stitch")
        check.integer("n_columns", n_columns, least=2)
        if dim is not None:
            check.integer("dim", dim)
        check.number("self_weight", self_weight, "in [0, 1]", lambda v: 0 <= v <= 1)
        check.done()
        self.n_columns, self.dim = n_columns, dim
        eye = torch.eye(n_columns)
        alpha = self_weight * eye + (1 - self_weight) / (n_columns - 1) * (1 - eye)
        self.alpha = nn.Parameter(alpha if dim is None else alpha.repeat(dim, 1, 1))

    def forward(self, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shapes = [tuple(c.shape) for c in columns]
        if len(columns) != self.n_columns:
            raise ConfigError(
                [
                    f"cross_stitch has n_columns={self.n_columns} but got {len(columns)} inputs "
                    f"(shapes {shapes}); set n_columns: {len(columns)}, one per task column"
                ]
            )
        if any(s != shapes[0] for s in shapes[1:]):  # no set: symbolic sizes do not hash
            raise ConfigError(
                [
                    f"cross_stitch mixes columns of one shape, got shapes {shapes}; give the "
                    "modules that feed it the same output width"
                ]
            )
        if self.dim is not None and (not shapes[0] or shapes[0][-1] != self.dim):
            width = shapes[0][-1] if shapes[0] else 0
            raise ConfigError(
                [
                    f"cross_stitch has dim={self.dim} but its columns have {width} features "
                    f"(shapes {shapes}); set dim: {width} (an alpha per feature), or drop dim "
                    "(one alpha for all features)"
                ]
            )
        stacked = torch.stack(columns, dim=-1)  # (..., d, K)
        if self.dim is None:
            mixed = stacked @ self.alpha.T  # out_i = sum_j alpha_ij in_j
        else:
            mixed = torch.einsum("...dj,dij->...di", stacked, self.alpha)
        return tuple(mixed.unbind(dim=-1))

    def extra_repr(self) -> str:
        return f"n_columns={self.n_columns}, dim={self.dim}"


class MTANAttention(nn.Module):
    """One task's MTAN attention module: a soft mask, learned from shared features, on a shared
    stage's output.

    ``attention(u, p, *previous)``: the mask ``a = sigmoid(BN(W_2 relu(BN(W_1 [u; previous]))))``
    (``W_1``, ``W_2``: 1x1 convolutions, one linear map over channels at every position) has
    ``p``'s shape and the output is ``a * p``. ``u`` and ``p`` are a shared stage's features (the
    same tensor when the stage has one output); ``previous`` is this task's earlier attention
    output brought to ``u``'s resolution (by a shared 3x3 convolution and pooling in the paper),
    concatenated along the channels. Inputs are maps ``(B, C, H, W)`` or vectors ``(B, D)``.

    Args:
        in_channels: Channels of the mask input: ``u``'s plus those of every ``previous`` input.
        out_channels: Channels of ``p``, of the mask and of the output.
        hidden: Channels of the mask's hidden layer (``None``: ``out_channels``, as in the paper).

    Raises:
        ConfigError: Every malformed argument at once.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.experts import MTANAttention
        >>> shared = torch.randn(2, 8, 4, 4)  # a shared stage's output, here both u and p
        >>> first = MTANAttention(in_channels=8, out_channels=8)
        >>> first(shared, shared).shape
        torch.Size([2, 8, 4, 4])
        >>> MTANAttention(in_channels=6, out_channels=4)(torch.randn(3, 4), torch.randn(3, 4),
        ...                                              torch.randn(3, 2)).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        check = ArgumentCheck("mtan_attention")
        check.integer("in_channels", in_channels)
        check.integer("out_channels", out_channels)
        if hidden is not None:
            check.integer("hidden", hidden)
        check.done()
        self.in_channels, self.out_channels = in_channels, out_channels
        width = out_channels if hidden is None else hidden
        self.mask = nn.Sequential(  # g: 1x1 conv - BN - ReLU; h: 1x1 conv - BN - sigmoid
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )

    def forward(self, u: torch.Tensor, p: torch.Tensor, *previous: torch.Tensor) -> torch.Tensor:
        inputs = (u, p, *previous)
        size = p.shape[2:]
        fits = (
            p.ndim in (2, 4)
            and all(t.ndim == p.ndim and t.shape[2:] == size for t in inputs)
            and p.shape[1] == self.out_channels
            and sum(t.shape[1] for t in (u, *previous)) == self.in_channels
        )
        if not fits:
            got = [tuple(t.shape) for t in inputs]
            raise ConfigError(
                [
                    f"mtan_attention expects u, p, *previous as (B, C, H, W) maps of one size or "
                    f"(B, D) vectors, with in_channels={self.in_channels} channels in u and "
                    f"previous together and out_channels={self.out_channels} in p, got shapes "
                    f"{got}; set in_channels and out_channels to the channels of the inputs"
                ]
            )
        x = torch.cat((u, *previous), dim=1) if previous else u
        if x.ndim == 2:  # vectors: 1x1 maps, so BatchNorm2d is BatchNorm1d over the batch
            return self.mask(x[:, :, None, None]).flatten(1) * p
        return self.mask(x) * p

    def extra_repr(self) -> str:
        hidden = self.mask[0].out_channels
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, hidden={hidden}"
