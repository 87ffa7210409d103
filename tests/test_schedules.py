import math

import pytest

from fastmoco.schedules import build_schedules


def test_lr_momentum_at_key_steps():
    spe, epochs, warm = 10, 300, 40
    s = build_schedules(base_lr=1.5e-4, global_batch=4096, epochs=epochs, warmup_epochs=warm,
                        steps_per_epoch=spe, m0=0.99)
    T, W = epochs * spe, warm * spe
    peak = 1.5e-4 * 4096 / 256
    assert s.total_steps == T
    assert s.lr[0] == 0.0
    assert s.lr[W // 2] == pytest.approx(peak / 2, rel=1e-12)
    assert s.lr[W] == pytest.approx(peak, rel=1e-12)              # end of warmup: the peak
    mid = W + (T - W) // 2
    assert s.lr[mid] == pytest.approx(peak * 0.5, rel=1e-12)      # half-way down the cosine
    assert s.lr[T - 1] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (T - 1 - W) / (T - W))), rel=1e-12)
    assert s.lr[T - 1] < peak * 1e-4
    assert s.momentum[0] == pytest.approx(0.99, abs=1e-15)
    assert s.momentum[T // 2] == pytest.approx(0.995, abs=1e-12)
    assert s.momentum[T - 1] == pytest.approx(1 - 0.01 * 0.5 * (1 + math.cos(math.pi * (T - 1) / T)), abs=1e-15)
    assert (s.momentum[1:] >= s.momentum[:-1]).all()


def test_constant_momentum_and_bad_epoch_length():
    s = build_schedules(base_lr=1e-3, global_batch=256, epochs=2, warmup_epochs=0, steps_per_epoch=5,
                        m0=0.996, cosine_momentum=False)
    assert (s.momentum == 0.996).all() and s.lr[0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_schedules(base_lr=1e-3, global_batch=256, epochs=2, warmup_epochs=0, steps_per_epoch=0, m0=0.99)
