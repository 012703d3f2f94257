"""Every training formula against a hand-computed case (streamgen.training.losses)."""
import pytest
import torch

from streamgen.training import losses as L


def full(v, shape=(1, 1, 1, 1, 1)):
    return torch.full(shape, float(v))


def test_shifted_timesteps_and_clamp():
    # shift 5: u=0.5 -> 1000 * 2.5 / 3 = 833.33; u=0 -> 0 -> clamp 20; u=1 -> 1000 -> clamp 980
    t = L.shifted_timesteps(torch.tensor([0.5, 0.0, 1.0]), 5.0, 20.0, 980.0)
    assert torch.allclose(t, torch.tensor([2500.0 / 3, 20.0, 980.0]))
    # shift 1 is the identity before the clamp
    assert torch.allclose(L.shifted_timesteps(torch.tensor([0.25]), 1.0), torch.tensor([250.0]))


def test_sample_timesteps_granularity():
    g = torch.Generator().manual_seed(0)
    t = L.sample_timesteps(3, 7, per="chunk", chunk_frames=3, generator=g)
    assert t.shape == (3, 7)
    assert torch.all(t[:, 0] == t[:, 2]) and torch.all(t[:, 3] == t[:, 5])
    assert float(t.min()) >= 20 and float(t.max()) <= 980
    c = L.sample_timesteps(2, 5, per="clip", generator=g)
    assert torch.all(c == c[:, :1])
    with pytest.raises(ValueError):
        L.sample_timesteps(1, 1, per="nope")


def test_noise_flow_x0_roundtrip():
    # x0=1, eps=3, t=250: x_t = 0.75*1 + 0.25*3 = 1.5; v = eps - x0 = 2; x0 = 1.5 - 0.25*2 = 1
    t = torch.tensor([[250.0]])
    x_t = L.noise_latents(full(1), full(3), t)
    assert torch.allclose(x_t, full(1.5))
    assert torch.allclose(L.x0_from_flow(x_t, full(2), t), full(1))
    assert torch.allclose(L.flow_from_x0(x_t, full(1), t), full(2))


def test_flow_matching_loss_hand_case():
    # target v = eps - x0 = 3 - 1 = 2; prediction 0 -> squared error 4; weight 0.5 -> 2
    assert L.flow_matching_loss(full(0), full(1), full(3)).item() == pytest.approx(4.0)
    w = torch.tensor([[0.5]])
    assert L.flow_matching_loss(full(0), full(1), full(3), weight=w).item() == pytest.approx(2.0)


def test_cfg_dropout_and_combine():
    text = torch.ones(3, 2, 4)
    out, keep = L.cfg_dropout(text, 0.5, mask=torch.tensor([True, False, True]))
    assert keep.tolist() == [True, False, True]
    assert out[1].abs().sum() == 0 and torch.all(out[0] == 1) and torch.all(out[2] == 1)
    assert L.cfg_dropout(text, 1.0)[0].abs().sum() == 0          # p=1 drops everything
    assert torch.all(L.cfg_dropout(text, 0.0)[0] == 1)           # p=0 keeps everything
    # Self-Forcing's real score: cond + g (cond - uncond) = 2 + 3 * (2 - 1) = 5
    assert L.cfg_combine(torch.tensor(2.0), torch.tensor(1.0), 3.0).item() == 5.0


def test_dmd_gradient_and_loss_hand_case():
    x = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1, 1)
    real = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    fake = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1, 1)
    # mean|x - real| = (1 + 2) / 2 = 1.5; grad = (fake - real) / 1.5 = [2/3, 0]
    g = L.dmd_gradient(x, fake, real)
    assert torch.allclose(g.float().flatten(), torch.tensor([2 / 3, 0.0]))
    xg = x.clone().requires_grad_(True)
    loss = L.dmd_loss(xg, g)
    # loss = 0.5 * mean(grad^2) = 0.5 * (4/9) / 2 = 1/9; d loss / dx = grad / numel
    assert loss.item() == pytest.approx(1 / 9)
    loss.backward()
    assert torch.allclose(xg.grad.flatten(), torch.tensor([1 / 3, 0.0]))


def test_dmd_normaliser_is_per_sample():
    x = torch.zeros(2, 1, 1, 1, 1)
    real = torch.tensor([1.0, 4.0]).view(2, 1, 1, 1, 1)
    fake = torch.zeros(2, 1, 1, 1, 1)
    assert torch.allclose(L.dmd_gradient(x, fake, real).float().flatten(), torch.tensor([-1.0, -1.0]))


def test_critic_loss_detaches_samples():
    x0 = torch.ones(1, 1, 1, 1, 1, requires_grad=True)
    v = torch.zeros(1, 1, 1, 1, 1, requires_grad=True)
    L.critic_loss(v, x0, full(3)).backward()
    assert x0.grad is None and v.grad.item() == pytest.approx(-4.0)   # d/dv (v - 2)^2 at 0


def test_exit_step_uniform():
    g = torch.Generator().manual_seed(0)
    draws = [L.sample_exit_step(4, g) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=4).float() / 4000
    assert set(draws) == {0, 1, 2, 3} and torch.all((counts - 0.25).abs() < 0.03)


def test_euler_and_ode_timesteps():
    # x=1, v=2 from t=500 to t=250: 1 + (0.25 - 0.5) * 2 = 0.5
    out = L.euler_step(full(1), full(2), torch.tensor([[500.0]]), torch.tensor([[250.0]]))
    assert torch.allclose(out, full(0.5))
    assert L.ode_timesteps(2, 1.0) == pytest.approx([1000.0, 500.0, 0.0])
    assert L.ode_timesteps(2, 5.0)[1] == pytest.approx(2500 / 3)
    # an Euler step with the exact flow of a straight path lands on x0
    x0, eps, t = full(1), full(3), torch.tensor([[800.0]])
    x_t = L.noise_latents(x0, eps, t)
    assert torch.allclose(L.euler_step(x_t, eps - x0, t, torch.zeros(1, 1)), x0)


def test_ema_update_hand_case():
    ema = {"w": torch.tensor([1.0])}
    L.ema_update(ema, {"w": torch.tensor([3.0])}, 0.9)
    assert ema["w"].item() == pytest.approx(1.2)          # 0.9 * 1 + 0.1 * 3
    L.ema_update(ema, {"w": torch.tensor([5.0])}, 0.0)    # decay 0 copies
    assert ema["w"].item() == 5.0
    assert L.ema_decay_at(200, 0.99, 200) == 0.0 and L.ema_decay_at(201, 0.99, 200) == 0.99


def test_lr_schedule_hand_computed():
    from streamgen.training.losses import lr_at
    # warmup 4 of 14 steps: 0.25, 0.5, 0.75, 1.0 x lr, then constant or cosine to 0.1 lr
    assert [lr_at(s, 14, 2.0, 4) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr_at(9, 14, 2.0, 4) == 2.0
    assert lr_at(4, 14, 2.0, 4, "cosine") == pytest.approx(2.0)
    assert lr_at(4, 14, 2.0, 4, "cosine", 0.1) == pytest.approx(2.0)
    assert lr_at(13, 14, 2.0, 4, "cosine", 0.1) == pytest.approx(0.2)
    assert lr_at(13, 14, 2.0, 0, "cosine", 0.0) == pytest.approx(0.0)
    assert lr_at(6, 13, 1.0, 0, "cosine", 0.0) == pytest.approx(0.5)   # p = 6/12


def test_sample_timesteps_high_noise_share():
    g = torch.Generator().manual_seed(0)
    t = L.sample_timesteps(4000, 6, per="chunk", chunk_frames=3, t_max=1000.0, high_p=0.5,
                           high_min=900.0, generator=g)
    assert torch.all(t[:, 0] == t[:, 2]) and torch.all(t[:, 3] == t[:, 5])       # still per chunk
    share = float((t >= 900).float().mean())
    base = float((L.sample_timesteps(4000, 6, per="chunk", t_max=1000.0, generator=g) >= 900).float().mean())
    assert abs(share - (0.5 + 0.5 * base)) < 0.03 and share > base + 0.2
    assert float(t.max()) <= 1000
    with pytest.raises(ValueError):
        L.sample_timesteps(2, 3, high_p=0.5, high_min=990.0, t_max=980.0)


def test_edge_l1_hand_case():
    p = torch.zeros(1, 2, 2)
    t = torch.tensor([[[0.0, 2.0], [0.0, 2.0]]])    # x-diffs 2, 2; y-diffs 0, 0
    assert float(L.edge_l1(p, t)) == pytest.approx(0.5 * (2.0 + 0.0))
    # a constant offset has no edges: the loss ignores it (L1 does not)
    assert float(L.edge_l1(t + 3.0, t)) == 0.0


def test_mix_context_takes_own_latents_on_clean_chunks_only():
    from streamgen.training.losses import mix_context
    noisy, own = torch.zeros(2, 6, 1, 1, 1), torch.ones(2, 6, 1, 1, 1)
    clean = torch.tensor([[True, False], [False, True]])
    got = mix_context(noisy, own, clean, 3)[:, :, 0, 0, 0]
    assert got.tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_self_chain_matches_the_sampler_and_keeps_context():
    """j steps of self_chain = the inference sampler's advance (same draws); clean frames untouched;
    implied_noise inverts add_noise."""
    from streamgen.engine.sampling import add_noise, advance
    from streamgen.training.losses import implied_noise, self_chain
    torch.manual_seed(0)
    x0 = torch.randn(1, 6, 2, 3, 3)
    noisy = torch.tensor([[False] * 3 + [True] * 3])
    ts = [1000.0, 750.0, 500.0, 250.0]
    A = torch.randn(2, 2, 1, 1)                                   # a toy linear "model"
    denoise = lambda x, t: (x * (1 - t[:, :, None, None, None] / 1000)) @ A.new_ones(3, 3) / 3 + A.sum()
    draws = [torch.randn(x0.shape) for _ in range(3)]
    it = iter(draws)
    got = self_chain(denoise, x0, noisy, ts, 2, lambda s: next(it))
    assert torch.equal(got[:, :3], x0[:, :3])
    it2 = iter([d[:, 3:] for d in draws])
    flow = lambda x, t: (x - denoise(torch.cat([x0[:, :3], x], 1), torch.tensor([[0.0] * 3 + [t] * 3]))[:, 3:]) / (t / 1000)
    ref = advance(flow, next(it2), ts, lambda s: next(it2), 2)
    assert torch.allclose(got[:, 3:], ref, atol=1e-5)
    t = torch.tensor([[0.0] * 3 + [500.0] * 3])
    eps = torch.randn(x0.shape)
    xt = torch.where(noisy[:, :, None, None, None], add_noise(x0, eps, 0.5), x0)
    e = implied_noise(xt, x0, t)
    assert torch.allclose(e[:, 3:], eps[:, 3:], atol=1e-5) and torch.equal(e[:, :3], torch.zeros_like(e[:, :3]))


def test_transition_pairs_take_context_from_data_and_noisy_frames_from_the_model():
    x0 = torch.arange(6.0).view(1, 6, 1, 1, 1).repeat(2, 1, 1, 1, 1)              # data frame f = f
    x0_hat = -x0                                                                  # model frame f = -f
    noisy = torch.tensor([[False, False, False, True, True, True], [True, True, True, False, False, False]])
    real, fake, b, f = L.transition_pairs(x0, x0_hat, noisy)
    # clip 0: frames 3, 4, 5 (frame 3's previous is clean data 2); clip 1: frames 1, 2 (frame 0 has none)
    assert b.tolist() == [0, 0, 0, 1, 1] and f.tolist() == [3, 4, 5, 1, 2]
    assert real[:, :, 0, 0, 0].tolist() == [[2, 3], [3, 4], [4, 5], [0, 1], [1, 2]]
    assert fake[:, :, 0, 0, 0].tolist() == [[2, -3], [-3, -4], [-4, -5], [0, -1], [-1, -2]]


def test_transition_pairs_judge_only_the_judged_frames_but_keep_the_model_s_previous_frame():
    x0 = torch.arange(6.0).view(1, 6, 1, 1, 1)
    x0_hat = -x0
    noisy = torch.tensor([[False, False, True, True, True, True]])
    judged = torch.tensor([[True, True, False, False, True, True]])                # frames 2, 3: too noisy
    real, fake, b, f = L.transition_pairs(x0, x0_hat, noisy, judged)
    assert f.tolist() == [4, 5]                                                   # clean frames 0, 1 never judged
    # frame 4's previous frame 3 is noisy (not judged): the model's own x0, as at inference
    assert fake[:, :, 0, 0, 0].tolist() == [[-3, -4], [-4, -5]] and real[:, :, 0, 0, 0].tolist() == [[3, 4], [4, 5]]


def test_hinge_losses():
    assert L.hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0   # confident and right
    assert L.hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 2.0
    assert L.hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_transition_critic_learns_blur_and_keys():
    """A few dozen hinge steps: the critic tells data transitions from blurred ones, and from data
    shown with the wrong key (here, the motion is a shift whose direction the key gives)."""
    from streamgen.training.discriminator import TransitionCritic
    torch.manual_seed(0)
    d = TransitionCritic(channels=2, action_dim=2, width=16)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.999))

    def batch(n=32):
        a = torch.randint(0, 2, (n,))
        prev = torch.randn(n, 2, 8, 8)
        cur = torch.where(a[:, None, None, None] == 1, prev.roll(1, -1), prev.roll(-1, -1))
        return torch.stack([prev, cur], 1), torch.nn.functional.one_hot(a, 2).float()

    def blur(p):
        return torch.stack([p[:, 0], torch.nn.functional.avg_pool2d(p[:, 1], 3, 1, 1)], 1)

    for _ in range(120):
        pair, a = batch()
        loss = L.hinge_d_loss(d(pair, a), d(blur(pair), a)) + torch.relu(1 + d(pair, 1 - a)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pair, a = batch(256)
        real, blurred, wrong = d(pair, a).mean(1), d(blur(pair), a).mean(1), d(pair, 1 - a).mean(1)
    assert (real > blurred).float().mean() > 0.9
    assert (real > wrong).float().mean() > 0.9
    assert d(pair, a).shape == (256, 4)
