"""Temporal smoothing: flicker reduction on a still scene, no lag on motion, scene cuts, batched state, dtSSD."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmbg_stream.engine.smoothing import TemporalSmoother, dtssd, grey, no_history, smooth_batch, smooth_streams

N = 64


def texture(gen, h, w, lo, hi):
    t = F.interpolate(torch.rand(1, 3, h // 4, w // 4, generator=gen), size=(h, w), mode="bilinear")
    return lo + (hi - lo) * t


def still_sequence(frames=30, seed=0):
    """A still textured frame with sensor noise; the prediction jitters on the soft edge and flips a few pixels."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(N).float(), torch.arange(N).float(), indexing="ij")
    r = ((yy - N / 2) ** 2 + (xx - N / 2) ** 2).sqrt()
    true = ((0.3 * N + 3 - r) / 6).clamp(0, 1)[None, None]
    image = texture(gen, N, N, 0.5, 1.0) * true + texture(gen, N, N, 0.0, 0.5) * (1 - true)
    band = (true > 0) & (true < 1)
    imgs, preds = [], []
    for _ in range(frames):
        imgs.append((image + 0.01 * torch.randn(image.shape, generator=gen)).clamp(0, 1))
        p = (true + 0.1 * (2 * torch.rand(true.shape, generator=gen) - 1) * band).flatten()
        flip = torch.randint(0, N * N, (12,), generator=gen)
        p[flip] = 1 - p[flip]
        preds.append(p.view_as(true).clamp(0, 1))
    return imgs, preds, true


def moving_sequence(frames=12, step=4, seed=1):
    """A sharp-edged textured box moving `step` px per frame over a textured background, alpha moving with it."""
    gen = torch.Generator().manual_seed(seed)
    bg, fg = texture(gen, N, N, 0.0, 0.5), texture(gen, N, N, 0.6, 1.0)
    x = torch.arange(N)
    imgs, preds, trues = [], [], []
    for t in range(frames):
        a = torch.zeros(1, 1, N, N)
        a[..., 16:48, :] = ((x >= 8 + step * t) & (x < 28 + step * t)).float()
        imgs.append(fg * a + bg * (1 - a))
        preds.append((a + 0.05 * (2 * torch.rand(a.shape, generator=gen) - 1)).clamp(0, 1))
        trues.append(a)
    return imgs, preds, trues


def run(smoother, imgs, preds, strength):
    return [smoother(p, f, strength) for p, f in zip(preds, imgs, strict=True)]


def edges(alpha):
    """Mean leading / trailing edge column (alpha > 0.5) over the box rows."""
    m = alpha[0, 0, 16:48] > 0.5
    x = torch.arange(N).expand_as(m)
    return torch.where(m, x, -1).amax(1).float().mean().item(), torch.where(m, x, N).amin(1).float().mean().item()


def test_dtssd_definition():
    g = np.zeros((3, 2, 2))
    p = g.copy()
    p[1, 0, 0] = 0.5  # frame 1: sqrt(0.25/4)*100 = 25; frame 2 (back to 0): also 25; frame 0 counts 0
    assert dtssd(p, g) == pytest.approx(50 / 3)
    assert dtssd(torch.from_numpy(p)[:, None], list(torch.from_numpy(g))) == pytest.approx(50 / 3)
    assert dtssd(g + 0.3, g) == 0.0  # a constant offset does not flicker


def test_still_scene_flicker_cut_by_more_than_half():
    imgs, preds, true = still_sequence()
    truth = true.expand(len(preds), -1, -1, -1)
    raw = dtssd(torch.cat(run(TemporalSmoother(), imgs, preds, 0.0)), truth)
    smooth = dtssd(torch.cat(run(TemporalSmoother(), imgs, preds, 0.8)), truth)
    assert raw == pytest.approx(dtssd(torch.cat(preds), truth))  # strength 0 is off
    assert smooth < 0.5 * raw, (raw, smooth)
    # Steadier without drifting: on average closer to the truth than the raw prediction.
    out = torch.cat(run(TemporalSmoother(), imgs, preds, 0.8))
    assert (out - true).abs().mean() < (torch.cat(preds) - true).abs().mean()


def test_moving_edge_lags_at_most_one_frame():
    imgs, preds, trues = moving_sequence(step=4)
    out = run(TemporalSmoother(), imgs, preds, 0.8)
    for t in range(1, len(out)):
        swept = (trues[t] != trues[t - 1]).float()
        err_now = ((out[t] - trues[t]).abs() * swept).sum()
        err_prev = ((out[t] - trues[t - 1]).abs() * swept).sum()
        assert err_now < err_prev, t
        for got, want in zip(edges(out[t]), edges(trues[t]), strict=True):
            assert abs(got - want) < 4, (t, got, want)  # within one step of the true edge


def test_plain_average_would_lag():
    """Guards the lag test itself: a motion-blind EMA of the same steadiness fails it."""
    imgs, preds, trues = moving_sequence(step=4)
    ema = [preds[0]]
    for p in preds[1:]:
        ema.append(torch.lerp(ema[-1], p, 1 - 0.9 * 0.8))
    assert max(abs(edges(o)[0] - edges(t)[0]) for o, t in zip(ema, trues, strict=True)) >= 4


def test_scene_cut_resets():
    imgs, preds, _ = still_sequence(frames=6)
    other_imgs, other_preds, _ = still_sequence(frames=2, seed=7)
    other_imgs = [1 - f for f in other_imgs]  # a completely different picture
    sm = TemporalSmoother()
    run(sm, imgs, preds, 1.0)
    assert not sm.scene_cut.any()
    out = sm(other_preds[0], other_imgs[0], 1.0)
    assert sm.scene_cut.all()
    assert torch.equal(out, other_preds[0])
    out = sm(other_preds[1], other_imgs[1], 1.0)  # smoothing resumes on the new scene
    assert not sm.scene_cut.any() and not torch.equal(out, other_preds[1])


def test_reset_and_first_frame_pass_through():
    imgs, preds, _ = still_sequence(frames=3)
    sm = TemporalSmoother()
    assert torch.equal(sm(preds[0], imgs[0], 1.0), preds[0])
    assert not torch.equal(sm(preds[1], imgs[1], 1.0), preds[1])
    sm.reset()
    assert torch.equal(sm(preds[2], imgs[2], 1.0), preds[2])


def test_batch_matches_per_stream_and_handles_missing_history():
    a_imgs, a_preds, _ = still_sequence(frames=3, seed=2)
    b_imgs, b_preds, _ = still_sequence(frames=3, seed=3)
    sa, sb = TemporalSmoother(), TemporalSmoother()
    ref_a = run(sa, a_imgs, a_preds, 0.8)
    ref_b = run(sb, b_imgs[1:], b_preds[1:], 0.3)  # stream b starts one frame later

    prev_a, prev_f = no_history(2, N, N), no_history(2, N, N)
    out, cut = smooth_batch(torch.cat([a_preds[0], b_preds[0]]), torch.cat([a_imgs[0], b_imgs[0]]), None, None, 0.5)
    assert torch.equal(out[:1], a_preds[0]) and not cut.any()
    prev_a[0:1], prev_f[0:1] = out[:1], grey(a_imgs[0])  # b is not started yet: its row stays NaN
    for t in (1, 2):
        frames = torch.cat([a_imgs[t], b_imgs[t]])
        out, cut = smooth_batch(torch.cat([a_preds[t], b_preds[t]]), frames, prev_a, prev_f, [0.8, 0.3])
        assert not cut.any() and not out.isnan().any()
        torch.testing.assert_close(out[0:1], ref_a[t])
        torch.testing.assert_close(out[1:2], ref_b[t - 1])
        prev_a, prev_f = out, grey(frames)


def test_consecutive_frames_of_one_stream_in_one_batch_are_smoothed_one_after_another():
    """A file stream hands the engine several frames at once: each must see the one before it as history."""
    a_imgs, a_preds, _ = moving_sequence(frames=5, seed=4)
    b_imgs, b_preds, _ = still_sequence(frames=2, seed=5)
    ref_a = run(TemporalSmoother(), a_imgs, a_preds, 0.6)
    ref_b = run(TemporalSmoother(), b_imgs, b_preds, 0.4)
    sa, sb = TemporalSmoother(), TemporalSmoother()
    first = smooth_streams([sa], a_preds[0], a_imgs[0], [0.6])
    # One batch: a's frames 1..4 with b's frames 0..1 between them, as the engine collects them.
    rows = [(sa, 1), (sb, 0), (sa, 2), (sa, 3), (sb, 1), (sa, 4)]
    imgs = {sa: a_imgs, sb: b_imgs}
    preds = {sa: a_preds, sb: b_preds}
    out = smooth_streams([sm for sm, _ in rows], torch.cat([preds[sm][t] for sm, t in rows]),
                         torch.cat([imgs[sm][t] for sm, t in rows]), [0.6 if sm is sa else 0.4 for sm, _ in rows])
    torch.testing.assert_close(first, ref_a[0])
    for i, (sm, t) in enumerate(rows):
        torch.testing.assert_close(out[i:i + 1], (ref_a if sm is sa else ref_b)[t])
    torch.testing.assert_close(sa.prev_alpha, ref_a[4])
    torch.testing.assert_close(sb.prev_alpha, ref_b[1])


def test_no_host_reads():
    """Meta tensors have no data: any .item()/.cpu()/bool() on a tensor inside the per-frame math would raise."""
    a, f = torch.rand(2, 1, N, N, device="meta"), torch.rand(2, 3, N, N, device="meta")
    out, cut = smooth_batch(a, f, no_history(2, N, N, device="meta"), no_history(2, N, N, device="meta"), [0.5, 0.2])
    out, cut = smooth_batch(a, f, out, grey(f), 0.5)
    sm = TemporalSmoother()
    sm(a[:1], f[:1], 0.8)
    assert sm(a[:1], f[:1], 0.8).shape == (1, 1, N, N) and cut.shape == (2,)


@pytest.mark.parametrize("gate", [32, 16])
def test_figures_hold_when_the_gate_runs_on_a_coarse_grid(monkeypatch, gate):
    """Large frames compute the motion gate on a coarse grid (scale 2 and 4 here); the figures must not move."""
    import rmbg_stream.engine.smoothing as smoothing

    monkeypatch.setattr(smoothing, "_GATE", gate)
    test_still_scene_flicker_cut_by_more_than_half()
    test_moving_edge_lags_at_most_one_frame()
