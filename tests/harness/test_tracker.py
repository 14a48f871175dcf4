"""StorageTracker: views count once, frees leave the count, peaks and 512-byte rounding, fake tensors."""

import pytest

torch = pytest.importorskip("torch")

from harness.tracker import (  # noqa: E402
    ACTIVATIONS,
    KV_CACHE,
    WEIGHTS,
    StorageTracker,
    allocator_bytes,
)


def test_allocator_rounding():
    # c10 CUDACachingAllocator round_size: 512-byte blocks in both pools; malloc(0) takes nothing.
    assert allocator_bytes(0) == 0
    assert allocator_bytes(1) == 512
    assert allocator_bytes(512) == 512
    assert allocator_bytes(513) == 1024
    assert allocator_bytes(3 * 2**20 + 1) == 3 * 2**20 + 512  # large pool: same 512-byte rule
    assert allocator_bytes(1000, granularity=1) == 1000


def test_views_count_once_and_frees_leave():
    tr = StorageTracker(granularity=1)
    with tr:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        views = [a[1:], a.view(10, 100), a.view(10, 100).t(), a[::2]]
        assert tr.live_bytes == 4000 and tr.live_storages == 1
        del a
        assert tr.live_bytes == 4000  # the views keep the storage alive
        views.clear()
        assert tr.live_bytes == 0
    assert tr.peak_bytes == 4000


def test_peak_of_hand_computed_sequence():
    tr = StorageTracker()  # 512-byte rounding
    with tr:
        x = torch.ones(100, 100)  # 40,000 B -> 40,448
        with tr.phase("mid"):
            y = x * 2  # +40,448 -> 80,896
            z = (y + 1).sum()  # y + 1 (40,448) lives with x, y; sum's 4 B -> 512 while y + 1 is live
            del y  # 40,448 + 512 live
        w = torch.empty(10)  # 40 B -> 512
        live_end = tr.live_bytes
    assert tr.peak_bytes == 3 * 40_448 + 512  # sum's output is made while its input y + 1 is live
    assert tr.peak_phase == "mid"
    assert live_end == 40_448 + 512 + 512
    del x, z, w
    assert tr.live_bytes == 0


def test_inplace_and_out_ops_do_not_allocate_but_resize_counts():
    tr = StorageTracker(granularity=1)
    with tr:
        a = torch.zeros(256)  # 1024 B
        a.add_(1)
        a.mul_(3)
        b = torch.empty(0)
        torch.add(a, a, out=b)  # resizes b's storage to 1024 B
        assert tr.live_bytes == 2048
        c = a.view(16, 16).T.contiguous()  # a real copy
        assert tr.live_bytes == 3072
    assert tr.peak_bytes == 3072


def test_existing_storages_and_tags():
    lin = torch.nn.Linear(64, 32, bias=True)  # 64*32*4 + 32*4 = 8,320 B (8,704 rounded: 8,192 + 512)
    tr = StorageTracker()
    assert tr.track_existing(lin, WEIGHTS) == 8192 + 512
    with tr:
        with tr.category(KV_CACHE):
            k = torch.empty(128)  # 512 B kv_cache
        with torch.no_grad():  # with grad, autograd would keep the input alive for backward
            y = lin(torch.ones(4, 64))  # input 1,024 B; output 512 B
    assert tr.breakdown()[WEIGHTS] == 8704
    assert tr.breakdown()[KV_CACHE] == 512
    assert tr.breakdown()[ACTIVATIONS] == 512  # the input was freed, y lives
    tr.tag(y, "logits")
    assert tr.breakdown()["logits"] == 512 and tr.breakdown()[ACTIVATIONS] == 0
    assert tr.peak_breakdown[WEIGHTS] == 8704
    assert tr.peak_bytes == 8704 + 512 + 1024 + 512
    del k, y
    assert tr.live_bytes == 8704


def test_reset_peak():
    tr = StorageTracker(granularity=1)
    with tr:
        a = torch.empty(1000, dtype=torch.uint8)
        del a
        tr.reset_peak()
        assert tr.peak_bytes == 0
        b = torch.empty(10, dtype=torch.uint8)
    assert tr.peak_bytes == 10 and tr.live_bytes == 10
    del b


def test_fake_tensors_full_size_without_memory():
    from torch._subclasses.fake_tensor import FakeTensorMode

    tr = StorageTracker()
    with FakeTensorMode(), tr:
        a = torch.empty(2**20, 4096, dtype=torch.bfloat16)  # 8 GiB, never allocated
        b = a[:, :2048]  # a view
        c = b.float()  # 8 GiB fp32 copy of the half view
        del a, b
        live_mid = tr.live_bytes
        del c
    assert tr.peak_bytes == 16 * 2**30
    assert live_mid == 8 * 2**30
    assert tr.live_bytes == 0
