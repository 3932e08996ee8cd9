"""TrackedMeter (the simulated accelerator), meter_for, and byte-size units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autobatch import InvalidInputError, TrackedMeter, is_oom_error, meter_for
from autobatch.units import format_bytes, parse_bytes

KiB = 1024
MiB = 1024**2
U8 = torch.uint8


def storage_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


# -- counting ----------------------------------------------------------------------------------


def test_counts_tensors_created_under_it_and_uncounts_them_when_freed():
    meter = TrackedMeter(MiB)
    assert meter.current() == 0
    with meter:
        a = torch.empty(1000, dtype=U8)
        assert meter.current() == 1000
        b = torch.ones(100)  # float32
        assert meter.current() == 1400
        c = a.float()  # a computation that makes new storage
        assert meter.current() == 5400
        del b
        assert meter.current() == 5000
    outside = torch.empty(10_000, dtype=U8)  # not under the meter: not counted
    assert meter.current() == 5000
    del a  # freed after the meter was left: still uncounted
    assert meter.current() == 4000
    del c, outside
    assert meter.current() == 0
    assert meter.peak() == 5400


def test_views_and_in_place_ops_allocate_nothing():
    meter = TrackedMeter(MiB)
    with meter:
        a = torch.zeros(64, 64)
        held = meter.current()
        assert held == 64 * 64 * 4
        views = [
            a[:8],
            a[:, 3],
            a.view(-1),
            a.reshape(4096),
            a.t(),
            a.transpose(0, 1),
            a.unsqueeze(0),
            a.detach(),
            a.narrow(0, 1, 3),
            a.expand(2, 64, 64),
        ]
        a.add_(1)
        a.mul_(2)
        a.clamp_(max=3)
        a[0].fill_(5)
        a.relu_()
        assert meter.current() == held
        copy = a.t().contiguous()  # a real copy is still counted
        assert meter.current() == 2 * held
        del a
        assert meter.current() == 2 * held  # the views keep the storage alive
        del views
        assert meter.current() == held
        del copy
    assert meter.current() == 0


def test_nested_use_keeps_counting_until_the_outermost_exit():
    meter = TrackedMeter(MiB)
    with meter:
        with meter:
            a = torch.empty(100, dtype=U8)
        b = torch.empty(200, dtype=U8)
        assert meter.current() == 300
    c = torch.empty(400, dtype=U8)
    assert meter.current() == 300
    del a, b, c


# -- capacity ----------------------------------------------------------------------------------


def test_allocation_that_does_not_fit_raises_before_it_happens():
    meter = TrackedMeter(10_000)
    with meter:
        held = torch.empty(6000, dtype=U8)
        with pytest.raises(torch.OutOfMemoryError, match="out of memory") as info:
            torch.empty(5000, dtype=U8)
        assert is_oom_error(info.value)
        assert meter.current() == 6000  # the failed allocation was not counted
        with pytest.raises(torch.OutOfMemoryError):
            held.float()  # a computation that does not fit fails the same way
        assert meter.current() == 6000
        assert meter.peak() == 6000
        exact = torch.empty(4000, dtype=U8)  # up to the capacity exactly fits
        assert meter.current() == meter.capacity() == 10_000
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1, dtype=U8)
        assert meter.current() == 10_000
        del held, exact
    assert meter.peak() == 10_000


def test_count_never_exceeds_capacity_through_training_steps():
    torch.manual_seed(0)
    capacity = 160 * KiB
    meter = TrackedMeter(capacity)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4))
    meter.track(model.parameters())
    params = meter.current()
    ooms = 0
    for batch_size in (1, 8, 64, 512, 4096):
        meter.reset_peak()
        try:
            with meter:
                loss = model(torch.randn(batch_size, 32)).pow(2).mean()
                loss.backward()
        except torch.OutOfMemoryError:
            ooms += 1
        loss = None
        model.zero_grad(set_to_none=True)
        assert meter.peak() <= capacity
        assert meter.current() == params
    assert ooms >= 2  # the largest sizes really ran out of memory


# -- peak --------------------------------------------------------------------------------------


def test_peak_and_reset_peak():
    meter = TrackedMeter(MiB)
    with meter:
        a = torch.empty(3000, dtype=U8)
        b = torch.empty(2000, dtype=U8)
        del b
    assert (meter.current(), meter.peak()) == (3000, 5000)
    meter.reset_peak()
    assert meter.peak() == 3000
    with meter:
        c = torch.empty(500, dtype=U8)
        del c
    assert meter.peak() == 3500
    del a
    meter.reset_peak()
    assert meter.peak() == 0


# -- track -------------------------------------------------------------------------------------


def test_track_counts_pre_existing_tensors_once():
    meter = TrackedMeter(MiB)
    a = torch.empty(1000, dtype=U8)
    b = torch.empty(10)
    meter.track([a, b, a, a[:10], b.view(2, 5)])
    assert meter.current() == 1040
    meter.track([a])
    assert meter.current() == 1040
    meter.track([torch.empty(0), torch.empty(100, device="meta")])  # no real bytes
    assert meter.current() == 1040
    assert meter.peak() == 1040
    del a
    assert meter.current() == 40
    del b
    assert meter.current() == 0


def test_track_of_a_model_counts_its_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20))
    meter = TrackedMeter(MiB)
    meter.track(model.state_dict(keep_vars=True).values())
    assert meter.current() == storage_bytes(*model.state_dict(keep_vars=True).values())
    del model
    assert meter.current() == 0


# -- autograd ----------------------------------------------------------------------------------


def test_backward_allocations_are_counted_and_freed():
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    meter = TrackedMeter(4 * MiB)
    meter.track(model.parameters())
    params = meter.current()
    with meter:
        x = torch.randn(512, 256)
        loss = model(x).relu().sum()
        after_forward = meter.current()
        loss.backward()
    grads = storage_bytes(*(p.grad for p in model.parameters()))
    assert grads == params
    assert meter.peak() >= after_forward + grads  # backward's allocations were seen
    del loss  # frees what the graph saved
    assert meter.current() == params + storage_bytes(x) + grads
    del x
    model.zero_grad(set_to_none=True)
    assert meter.current() == params


def test_backward_that_does_not_fit_raises_out_of_memory():
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    x = torch.randn(4, 256)
    with TrackedMeter(MiB) as forward_meter:
        loss = model(x).sum()
    forward_bytes = forward_meter.peak()
    del loss
    params = storage_bytes(*model.parameters())
    # Room for the parameters and the forward pass, not for the gradients.
    meter = TrackedMeter(params + forward_bytes + 1024)
    meter.track(model.parameters())
    with meter:
        loss = model(x).sum()
        with pytest.raises(torch.OutOfMemoryError):
            loss.backward()
    assert meter.peak() <= meter.capacity()
    assert model.weight.grad is None


# -- meter_for ---------------------------------------------------------------------------------


def test_meter_for_cpu_needs_a_memory_budget():
    with pytest.raises(InvalidInputError, match="memory_budget"):
        meter_for("cpu")
    meter = meter_for("cpu", "3MiB")
    assert isinstance(meter, TrackedMeter)
    assert meter.capacity() == 3 * MiB
    assert meter_for(torch.device("cpu"), 4096).capacity() == 4096


@pytest.mark.parametrize("budget", ["lots", "-1GB", "2XB", "", "0", 0, -5])
def test_meter_for_rejects_budgets_that_do_not_parse(budget):
    with pytest.raises(InvalidInputError, match="memory_budget"):
        meter_for("cpu", budget)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_meter_for_cuda_without_cuda_says_how_to_simulate():
    with pytest.raises(InvalidInputError, match="memory-budget"):
        meter_for("cuda")


@pytest.mark.parametrize(
    ("device", "available"),
    [
        ("mps", lambda: torch.backends.mps.is_available()),
        ("xpu", lambda: hasattr(torch, "xpu") and torch.xpu.is_available()),
    ],
)
def test_meter_for_an_absent_accelerator_is_rejected_up_front(device, available):
    if available():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(InvalidInputError, match="memory_budget"):
        meter_for(device)


# -- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * MiB),
        ("512 mb", 512_000_000),
        (" 3 TiB ", 3 * 1024**4),
        ("1KiB", 1024),
        ("10k", 10_000),
        ("100", 100),
        ("100B", 100),
        (".5KiB", 512),
        ("1e3GiB", 1000 * 1024**3),
        ("2.5e3", 2500),
        (4096, 4096),
        (2.5e3, 2500),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        "lots",
        "-1GB",
        "2XB",
        "",
        "GB",
        "1.2.3MB",
        "0",
        "0.1",
        0,
        -5,
        True,
        float("inf"),
        float("nan"),
    ],
)
def test_parse_bytes_rejects_what_is_not_a_positive_size(value):
    with pytest.raises(InvalidInputError) as info:
        parse_bytes(value, name="max_memory")
    message = str(info.value)
    assert "max_memory" in message
    assert "GiB" in message  # shows how to write a size


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (5 * MiB, "5.00 MiB"),
        (2 * 1024**3, "2.00 GiB"),
        (5 * 1024**4, "5.00 TiB"),
        (3 * 1024**5, "3072.00 TiB"),
    ],
)
def test_format_bytes(size, text):
    assert format_bytes(size) == text


@pytest.mark.parametrize("size", [1, 1000, 3 * MiB, 7 * 1024**3])
def test_format_then_parse_round_trips(size):
    assert parse_bytes(format_bytes(size).replace(" ", "")) == pytest.approx(size, rel=0.005)


# -- storage that grows in place ---------------------------------------------------------------


def test_resize_and_out_tensors_that_grow_are_counted():
    meter = TrackedMeter(MiB)
    with meter:
        grown = torch.empty(0, dtype=U8)
        grown.resize_(1000)  # an empty tensor made under the meter, grown in place
        assert meter.current() == 1000
        grown.resize_(3000)
        assert meter.current() == 3000
        out = torch.empty(0)
        torch.mm(torch.ones(10, 10), torch.ones(10, 10), out=out)
        assert meter.current() == 3000 + 400
        small = torch.empty(10, dtype=U8)
        with pytest.warns(UserWarning, match="resized"):
            torch.add(torch.zeros(0, dtype=U8).new_ones(100), 1, out=small)
        assert meter.current() == 3000 + 400 + 100  # the output grew from 10 to 100 bytes
    del grown, out, small
    assert meter.current() == 0
    assert meter.peak() >= 3500  # with the temporary inputs of the operations


def test_growth_in_place_that_does_not_fit_raises_and_is_undone():
    meter = TrackedMeter(10_000)
    with meter:
        grown = torch.empty(1000, dtype=U8)
        with pytest.raises(torch.OutOfMemoryError):
            grown.resize_(20_000)
        assert meter.current() == 1000
        assert grown.untyped_storage().nbytes() == 1000
        assert meter.refused() == 20_000  # what it held plus what the growth asked for
    meter.reset_peak()
    assert meter.refused() is None
    del grown


def test_capped_lowers_the_capacity_while_inside():
    meter = TrackedMeter(10_000)
    with meter.capped(4000), meter:
        assert meter.capacity() == 4000
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(5000, dtype=U8)
    assert meter.capacity() == 10_000


# -- sparse tensors ----------------------------------------------------------------------------


def sparse_bytes(tensor: torch.Tensor) -> int:
    if tensor.layout == torch.sparse_coo:
        return storage_bytes(tensor._indices(), tensor._values())
    return storage_bytes(tensor.crow_indices(), tensor.col_indices(), tensor.values())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_count_their_indices_and_values():
    meter = TrackedMeter(MiB)
    dense = torch.zeros(64, 64)
    dense[::8, ::4] = 1.0
    with meter:
        coo = dense.to_sparse()
        assert meter.current() == sparse_bytes(coo) > 0
        csr = dense.to_sparse_csr()
        assert meter.current() == sparse_bytes(coo) + sparse_bytes(csr)
        del coo
        assert meter.current() == sparse_bytes(csr)
        meter.track([csr])  # counted once
        assert meter.current() == sparse_bytes(csr)
        del csr
    assert meter.current() == 0


def test_a_sparse_gradient_is_counted_and_one_that_does_not_fit_raises():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10_000, 32, sparse=True)
    tokens = torch.randint(0, 10_000, (256, 16))
    meter = TrackedMeter(8 * MiB)
    meter.track(bag.parameters())
    params = meter.current()
    optimizer = torch.optim.SGD(bag.parameters(), lr=0.1, momentum=0.9)
    with meter:
        for _ in range(2):  # the second step accumulates into the momentum in place
            bag(tokens).sum().backward()
            optimizer.step()
            grad = bag.weight.grad
            assert grad.layout == torch.sparse_coo
            momentum = optimizer.state[bag.weight]["momentum_buffer"]
            assert meter.current() == params + sparse_bytes(grad) + sparse_bytes(momentum)
            optimizer.zero_grad(set_to_none=True)
            del grad
    assert meter.peak() <= meter.capacity()
    optimizer.state.clear()
    del momentum
    assert meter.current() == params
    with meter.capped(params + 1000), meter, pytest.raises(torch.OutOfMemoryError):
        bag(tokens).sum().backward()
    assert meter.current() == params
