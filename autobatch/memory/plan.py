"""Plan for a card you do not have: the tracked meter's accounting over fake tensors.

Under torch's ``FakeTensorMode`` every tensor carries its shape, dtype and storage size but no
data, and every operation works out its outputs without running a kernel. ``PlanMeter`` counts
those storages by the same rules as the simulated accelerator (``TrackedMeter``) and raises
``torch.OutOfMemoryError`` past its capacity, so the probe's search runs unchanged: a training
step that would need 60 GiB takes a fraction of a second and no memory.

``FakeTensorMode`` lives in a private torch module; plans are verified on the torch versions in
``VERIFIED_TORCH`` and refused on others with a one-line error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container
from typing import Any

import torch
from torch import nn

from autobatch.errors import InvalidInputError
from autobatch.memory.tracked import TrackedMeter
from autobatch.snapshot import lazy_names
from autobatch.units import format_bytes

#: torch releases (major.minor) on which a plan was checked against the simulated accelerator.
VERIFIED_TORCH = ("2.13",)


def check_torch_version(version: str | None = None) -> None:
    """Refuse a plan on a torch release it was not verified on: it relies on private APIs."""
    version = version or torch.__version__
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release not in VERIFIED_TORCH:
        raise InvalidInputError(
            f"plan_for relies on torch's private FakeTensorMode and is verified on torch "
            f"{', '.join(VERIFIED_TORCH)}; this is torch {version}. Install torch=="
            f"{VERIFIED_TORCH[-1]}.*, or probe on the card itself (--device cuda)"
        )


def fake_mode() -> Any:
    """A FakeTensorMode that turns real inputs (the training data) into fakes on first use."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


class PlanMeter(TrackedMeter):
    """The simulated accelerator over fake tensors: predicts, allocates nothing.

    Entering the meter enters a fake mode too, so everything made under it (the model, the
    optimizer state, batches, activations) is fake; the fake mode stays the same across
    entries, since a fake tensor belongs to the mode that made it.
    """

    def __init__(self, capacity: int, device: str | torch.device = "cpu") -> None:
        check_torch_version()
        super().__init__(capacity, device)
        self.limit = self._capacity  # the planned card's size: part of the probe cache key
        self.fake = fake_mode()
        self._stack: list[contextlib.ExitStack] = []

    @property
    def name(self) -> str:
        return f"plan:{format_bytes(self._capacity).replace(' ', '')}"

    def __enter__(self) -> PlanMeter:
        stack = contextlib.ExitStack()
        stack.enter_context(self.fake)
        super().__enter__()
        stack.callback(super().__exit__, None, None, None)
        self._stack.append(stack)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.pop().close()

    def _counts(self, storage: torch.UntypedStorage) -> bool:
        return True  # a fake tensor's storage is on meta, and stands for the planned device's

    def _planned_bytes(self, func: Any, args: tuple, kwargs: dict, sparse: bool) -> int | None:
        # Running an operation under the fake mode costs no memory: measure its outputs after.
        return None

    def _register(self, tensor: torch.Tensor, given: Container[int] = ()) -> None:
        if tensor.layout != torch.strided:
            # torch's fake kernels drop a sparse tensor's entries (a clone has none): the plan
            # would leave out a sparse embedding's gradient.
            raise InvalidInputError(
                "plan_for cannot plan a step with sparse tensors (a sparse embedding's "
                "gradient): torch's fake tensors lose their entries; probe with memory_budget= "
                "instead"
            )
        super()._register(tensor, given)


def build_fake(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[Any, float], torch.optim.Optimizer],
    lr: float,
    meter: PlanMeter,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model made on the meta device (no memory), its parameters and buffers turned into fake
    tensors on the meter's device under the meter, and its optimizer.

    ``model.to(device)`` cannot move fake parameters (torch swaps them, and refuses), so the
    model is made on meta and converted instead; tied parameters stay tied.
    """
    try:
        with torch.device("meta"):
            model = make_model()
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" not in str(exc):
            raise
        # The factory read a tensor's values (an orthogonal parametrization checks its
        # weight, an init asserts on a norm): meta tensors have none.
        raise InvalidInputError(
            "plan_for cannot build this model without memory: Task.model() reads tensor "
            f"values as it builds it ({str(exc).splitlines()[0]}); probe with memory_budget= "
            "instead"
        ) from exc
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"Task.model() returned {type(model).__name__}; it must return a torch.nn.Module"
        )
    # A lazy parameter takes its shape in the first forward pass, as a tensor the fake mode
    # cannot make into one of the model's (fake) parameters.
    if lazy := lazy_names(model):
        raise InvalidInputError(
            f"plan_for cannot plan a model with lazy modules ({', '.join(lazy[:3])}); give "
            "their sizes (nn.Linear(in, out) for nn.LazyLinear(out)), or probe with "
            "memory_budget= instead"
        )
    fakes: dict[int, torch.Tensor] = {}
    with meter:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    if id(param) not in fakes:
                        fake = torch.empty_like(param, device=meter.device)
                        fakes[id(param)] = nn.Parameter(fake, requires_grad=param.requires_grad)
                    module._parameters[name] = fakes[id(param)]
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    if id(buffer) not in fakes:
                        fakes[id(buffer)] = torch.zeros_like(buffer, device=meter.device)
                    module._buffers[name] = fakes[id(buffer)]
        optimizer = make_optimizer(model.parameters(), lr)
    return model, optimizer
