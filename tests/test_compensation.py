"""CompensationTables / CompensationHead semantics, persistence, export, and the closed-form fits.

Tiny CPU shapes throughout. Numeric checks state their tolerance and print what they measured."""

from __future__ import annotations

import copy

import diffusers
import numpy as np
import pytest
import torch

from qdc_export.compensation import (
    METHODS,
    CompensationTables,
    FitOptions,
    apply_compensation,
    fit_from_pairs,
    fit_tables,
    lookup_tolerance,
    sampler_coefficients,
)
from qdc_export.errors import UserError

N_STEPS = 8
C = 4
K_TRUE = torch.tensor([0.05, -0.08, 0.12, 0.03])  # synthetic per-channel output scaling error


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convs on a shared 2-core box: intra-op threading makes them ~100x slower under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=C, out_channels=C, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    return model


@pytest.fixture(scope="module")
def fp_denoiser(unet):
    def fn(x, t):
        with torch.no_grad():
            return unet(x, t).sample
    return fn


@pytest.fixture()
def ddim():
    return diffusers.DDIMScheduler(clip_sample=False)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(1))


def _random_tables(n=N_STEPS, c=C, seed=0, method="tcec-m1-fitted", timesteps=None):
    g = np.random.default_rng(seed)
    ts = np.arange(n)[::-1] * 100.0 + 99 if timesteps is None else np.asarray(timesteps, np.float64)
    return CompensationTables.from_rows(
        method, ts, 1 + 0.1 * g.standard_normal((n, c)), 0.1 * g.standard_normal((n, c)),
        0.1 * g.standard_normal((n, c)), options={"seed": seed}, stats={"note": [1.5, 2.5]},
    )


def _sample(denoiser, sched, n, latents, head=None):
    """A plain diffusers-style loop; with ``head`` the model output is compensated by the runtime head."""
    sched = copy.deepcopy(sched)
    sched.set_timesteps(n)
    x = latents * sched.init_noise_sigma
    state = torch.zeros_like(x)
    for t in sched.timesteps:
        out = denoiser(sched.scale_model_input(x, t), t)
        if head is not None:
            out, state = head(out, t, state)
        x = sched.step(out, t, x).prev_sample
    return x


def _rel(a, b):
    return float((a - b).double().pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


# ---- (c) timestep -> row ---------------------------------------------------------------------------------------------
def test_timestep_to_row_integer_ddim_timesteps(ddim):
    c = sampler_coefficients(ddim, 10)
    tab = CompensationTables.identity(c.timesteps, C)
    head = tab.head()
    ddim.set_timesteps(10)
    rows = head.rows(ddim.timesteps)  # int64 input, as diffusers passes it
    assert rows.dtype == torch.long and rows.tolist() == list(range(10))
    for i, t in enumerate(ddim.timesteps):  # 0-d tensor and python int
        assert head.rows(t).tolist() == [i] and tab.row_for(int(t)) == i
    assert tab.tolerance == 0.5  # min gap 100 -> 25, capped at 0.5
    assert list(c.timesteps[:2]) == [900.0, 800.0]  # leading spacing: 900, 800, ..., 0
    assert head.rows(torch.tensor([900.4, 900.6, 500, 499.4, -3, 5000])).tolist() == [0, 10, 4, 10, 10, 10]


def test_timestep_to_row_fractional_euler_timesteps():
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             use_karras_sigmas=True)
    c = sampler_coefficients(sched, 12)
    assert np.any(c.timesteps != np.round(c.timesteps)), "expected fractional timesteps"
    head = CompensationTables.identity(c.timesteps, C).head()
    sched.set_timesteps(12)
    assert head.rows(sched.timesteps).tolist() == list(range(12))  # float32 values as diffusers passes them
    tol = lookup_tolerance(c.timesteps)
    gap = np.min(np.abs(np.diff(c.timesteps)))
    print(f"euler karras: min gap={gap:.4f} tol={tol:.4f}")
    assert tol == pytest.approx(min(0.25 * gap, 0.5))
    off = torch.tensor(c.timesteps[3] + 2.0 * tol, dtype=torch.float32)
    near = torch.tensor(c.timesteps[3] + 0.5 * tol, dtype=torch.float32)
    assert head.rows(off).tolist() == [12] and head.rows(near).tolist() == [3]


def test_timestep_to_row_cfg_batch_and_unknown_timestep_is_identity(ddim):
    tab = _random_tables(timesteps=sampler_coefficients(ddim, N_STEPS).timesteps)
    head = tab.head()
    ts = torch.tensor(tab.timesteps, dtype=torch.float32)
    t2 = torch.cat([ts, ts])  # classifier-free guidance duplicates the batch
    assert head.rows(t2).tolist() == list(range(N_STEPS)) * 2
    # unknown timestep -> identity row: eps_hat == eps_q whatever the state
    eps = torch.randn(2, C, 4, 4)
    out, state = head(eps, torch.tensor([123.0, 123.0]), torch.randn(2, C, 4, 4))
    assert torch.equal(out, eps) and torch.equal(state, eps)
    # batch of 2B with one timestep per element, mixed known/unknown
    t_mixed = torch.tensor([ts[2], 7.0])
    out, _ = head(eps, t_mixed, torch.zeros_like(eps))
    s = torch.tensor(tab.scale[2]).view(1, C, 1, 1)
    b = torch.tensor(tab.bias[2]).view(1, C, 1, 1)
    assert torch.allclose(out[0:1], s * eps[0:1] - b) and torch.equal(out[1], eps[1])


def test_duplicate_timesteps_rejected():
    with pytest.raises(UserError, match="distinct"):
        CompensationTables.identity([999, 999, 500], C)
    with pytest.raises(UserError, match="identity row"):
        t = CompensationTables.identity([999, 500], C)
        CompensationTables("none", t.timesteps, t.scale * 2, t.prev, t.bias)
    with pytest.raises(UserError, match="method"):
        CompensationTables.identity([999, 500], C).__class__("bogus", [1.0], np.ones((2, C)), np.zeros((2, C)),
                                                             np.zeros((2, C)))


# ---- (d) state handling ---------------------------------------------------------------------------------------------
def test_state_loop_matches_manual_formula():
    tab = _random_tables()
    head = tab.head()
    assert tab.uses_state
    g = torch.Generator().manual_seed(3)
    state = torch.zeros(2, C, 4, 4)
    raw_prev = torch.zeros(2, C, 4, 4)
    worst = 0.0
    for i, t in enumerate(tab.timesteps):
        eps_q = torch.randn(2, C, 4, 4, generator=g)
        eps_hat, state = head(eps_q, torch.tensor(t), state)
        s, p, b = (torch.tensor(a[i], dtype=torch.float32).view(1, C, 1, 1) for a in (tab.scale, tab.prev, tab.bias))
        manual = s * eps_q - p * raw_prev - b
        worst = max(worst, float((eps_hat - manual).abs().max()))
        assert torch.equal(state, eps_q), "state out must be the RAW output"
        raw_prev = eps_q
    print(f"head vs manual formula over {tab.num_steps} steps: max abs diff {worst:.1e}")
    assert worst == 0.0
    # functional form, state=None means zeros
    e0 = torch.randn(1, C, 2, 2)
    out, st = apply_compensation(tab, e0, tab.timesteps[0])
    assert torch.equal(st, e0)
    assert torch.equal(out, head(e0, torch.tensor(tab.timesteps[0]), torch.zeros_like(e0))[0])


def test_per_branch_compensation_equals_guided_compensation():
    """CFG is affine with weights summing to 1, so compensating each branch == compensating the guided output."""
    tab = _random_tables()
    head = tab.head()
    w = 7.5
    g = torch.Generator().manual_seed(5)
    st_branch = torch.zeros(4, C, 4, 4)
    st_guided = torch.zeros(2, C, 4, 4)
    worst = 0.0
    for t in tab.timesteps:
        both = torch.randn(4, C, 4, 4, generator=g)  # [uncond; cond]
        hat, st_branch = head(both, torch.tensor([t] * 4), st_branch)
        u, c = hat.chunk(2)
        per_branch = u + w * (c - u)
        ru, rc = both.chunk(2)
        guided_hat, st_guided = head(ru + w * (rc - ru), torch.tensor(t), st_guided)
        worst = max(worst, float((per_branch - guided_hat).abs().max() / guided_hat.abs().max()))
    print(f"per-branch vs guided compensation: max rel diff {worst:.1e}")
    assert worst < 1e-5


# ---- export ----------------------------------------------------------------------------------------------------------
def test_head_torch_export_runs():
    tab = _random_tables()
    head = tab.head().eval()
    eps = torch.randn(4, C, 8, 8)
    t = torch.tensor([tab.timesteps[1]] * 2 + [3.0, tab.timesteps[5]], dtype=torch.float32)
    state = torch.randn(4, C, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(
        head, (eps, t, state), strict=False,
        dynamic_shapes={"eps_q": {0: batch}, "timestep": {0: batch}, "state": {0: batch}},
    )
    got = ep.module()(eps, t, state)
    ref = head(eps, t, state)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # another batch size through the same exported program (CFG-doubled)
    eps2, t2, st2 = torch.randn(8, C, 8, 8), t.repeat(2), torch.randn(8, C, 8, 8)
    assert torch.equal(ep.module()(eps2, t2, st2)[0], head(eps2, t2, st2)[0])
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    print("exported ops:", sorted(ops))


# ---- (e) save / load ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip_exact(tmp_path):
    sched = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    tab = _random_tables(n=9, timesteps=sampler_coefficients(sched, 9).timesteps)
    tab.save(tmp_path / "comp")
    back = CompensationTables.load(tmp_path / "comp")
    assert back.method == tab.method and back.options == tab.options and back.stats == tab.stats
    for name in ("timesteps", "scale", "prev", "bias"):
        a, b = getattr(tab, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.uses_state == tab.uses_state
    with pytest.raises(UserError, match="no compensation tables"):
        CompensationTables.load(tmp_path / "missing")


def test_identity_tables():
    tab = CompensationTables.identity([999.0, 499.0], 3)
    assert tab.method == "none" and tab.is_identity and not tab.uses_state
    assert tab.scale.shape == (3, 3) and tab.scale.dtype == np.float32


# ---- (a) sanity: quantized == FP  =>  every coefficient ~ 0 ----------------------------------------------------------
SANITY_CASES = [
    ("ptqd", {}),
    ("tac", {"fit_bias": True}),
    ("tcec-m0", {"fit_bias": True}),
    ("tcec-m1-analytic", {}),
    ("tcec-m1-fitted", {"fit_bias": True}),
    ("tcec-m1-fitted", {"target": "cumulative", "g": 0.5}),
]


@pytest.mark.parametrize("method,opts", SANITY_CASES, ids=[f"{m}-{'-'.join(o)}" for m, o in SANITY_CASES])
def test_sanity_fp_as_quantized_gives_zero_coefficients(method, opts, fp_denoiser, ddim, latents):
    tab = fit_tables(method, fp_denoiser, fp_denoiser, ddim, N_STEPS, latents, **opts)
    ds = float(np.abs(tab.scale - 1).max())
    dp = float(np.abs(tab.prev).max())
    db = float(np.abs(tab.bias).max())
    print(f"{method} {opts}: max|scale-1|={ds:.1e} max|prev|={dp:.1e} max|bias|={db:.1e}")
    assert max(ds, dp, db) < 1e-6
    assert tab.stats["final_latent_rel_error"] == 0.0


OTHER_SAMPLERS = [
    ("ddpm", lambda: diffusers.DDPMScheduler(clip_sample=False)),
    ("euler", lambda: diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012)),
    ("dpmpp2m", lambda: diffusers.DPMSolverMultistepScheduler()),
]


@pytest.mark.parametrize("name,make", OTHER_SAMPLERS, ids=[n for n, _ in OTHER_SAMPLERS])
def test_fit_on_other_samplers(name, make, fp_denoiser, latents):
    """Sanity (FP as quantized -> zero coefficients) and the m1-fitted cumulative fit on DDPM (stochastic steps,
    seeded alike), Euler (scaled model input, init_noise_sigma) and DPM-Solver++ 2M (multistep)."""
    sched = make()
    tab = fit_tables("tcec-m1-fitted", fp_denoiser, fp_denoiser, sched, N_STEPS, latents, target="cumulative",
                     fit_bias=True)
    dev = max(float(np.abs(tab.scale - 1).max()), float(np.abs(tab.prev).max()), float(np.abs(tab.bias).max()))
    k = K_TRUE.view(1, C, 1, 1)
    tab_q = fit_tables("tcec-m1-fitted", lambda x, t: (1 + k) * fp_denoiser(x, t), fp_denoiser, sched, N_STEPS,
                       latents)
    raw = fit_tables("none", lambda x, t: (1 + k) * fp_denoiser(x, t), fp_denoiser, sched, N_STEPS, latents)
    before, after = raw.stats["final_latent_rel_error"], tab_q.stats["final_latent_rel_error"]
    print(f"{name}: sanity max coef dev={dev:.1e}; scaled model final rel err raw={before:.3e} "
          f"m1-fitted={after:.3e}")
    assert dev < 1e-6
    assert after / before < 0.2


def test_all_methods_covered_by_sanity():
    assert {m for m, _ in SANITY_CASES} | {"none"} == set(METHODS)


# ---- (b) synthetic per-channel scaling error ------------------------------------------------------------------------
def test_m0_recovers_known_channel_scaling_and_shrinks_final_error(fp_denoiser, ddim, latents):
    k = K_TRUE

    def quant(x, t):
        return (1 + k.view(1, C, 1, 1)) * fp_denoiser(x, t)

    tab, pairs = fit_tables("tcec-m0", quant, fp_denoiser, ddim, N_STEPS, latents, return_trajectories=True)
    K = 1 - tab.scale[:N_STEPS]
    expected = (k / (1 + k)).numpy()[None, :]
    k_err = float(np.abs(K - expected).max())
    x_fp = _sample(fp_denoiser, ddim, N_STEPS, latents)
    x_raw = _sample(quant, ddim, N_STEPS, latents)
    x_comp = _sample(quant, ddim, N_STEPS, latents, head=tab.head())
    before, after = _rel(x_raw, x_fp), _rel(x_comp, x_fp)
    print(f"tcec-m0: max|K - k/(1+k)|={k_err:.1e}; final latent rel err raw={before:.3e} "
          f"compensated={after:.3e} ratio={after / before:.4f}")
    assert k_err < 1e-3
    assert after / before < 0.2
    assert abs(tab.stats["final_latent_rel_error"] - before) < 1e-6 * max(1.0, before)  # uncompensated run
    # the same fit from the collected pairs (no model re-run)
    again = fit_from_pairs("tcec-m0", pairs)
    assert np.array_equal(again.scale, tab.scale)


RICHER_CASES = [
    # (method, options, per-channel k? -- PTQD's k is one scalar per step, so it gets a uniform scaling)
    ("tcec-m0", {"fit_bias": True}, True),
    ("tcec-m1-fitted", {"fit_bias": True}, True),
    ("tcec-m1-fitted", {"target": "cumulative", "fit_bias": True}, True),
    ("tac", {"fit_bias": True}, True),
    ("ptqd", {}, False),
]


@pytest.mark.parametrize("method,opts,per_channel", RICHER_CASES,
                         ids=[f"{m}-{'-'.join(o)}" for m, o, _ in RICHER_CASES])
def test_scaled_plus_offset_model_is_compensated(method, opts, per_channel, fp_denoiser, ddim, latents):
    """eps~ = (1 + k) eps + 0.01: every method whose error model covers it must shrink the final error 5x."""
    k = (K_TRUE if per_channel else torch.full((C,), 0.1)).view(1, C, 1, 1)

    def quant(x, t):
        return (1 + k) * fp_denoiser(x, t) + 0.01

    x_fp = _sample(fp_denoiser, ddim, N_STEPS, latents)
    before = _rel(_sample(quant, ddim, N_STEPS, latents), x_fp)
    tab = fit_tables(method, quant, fp_denoiser, ddim, N_STEPS, latents, **opts)
    after = _rel(_sample(quant, ddim, N_STEPS, latents, head=tab.head()), x_fp)
    fit_final = tab.stats["final_latent_rel_error"]
    print(f"{method} {opts}: final latent rel err raw={before:.3e} compensated={after:.3e} "
          f"ratio={after / before:.4f} (fit-run final {fit_final:.3e}, sequential={tab.options['sequential']}, "
          f"uses_state={tab.uses_state})")
    assert after / before < 0.2
    if tab.options["sequential"]:  # the calibration run is the deployed run
        assert abs(fit_final - after) <= 1e-6 * max(after, 1e-3)


def _ddim_rho_by_hand(n_steps: int) -> np.ndarray:
    """rho_n = A_n B_{n+1} / B_n for diffusers' default DDIM (linear betas 1e-4..0.02 over 1000 steps, eta 0,
    epsilon prediction, "leading" spacing, alpha-bar 1 after the last step), written out from the DDIM update
    x_prev = sqrt(ab_prev) (x - sqrt(1 - ab) eps) / sqrt(ab) + sqrt(1 - ab_prev) eps, independently of
    qdc_export.compensation.coefficients. alpha-bar is a float32 cumprod, as diffusers keeps it."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    abar = torch.cumprod(1.0 - betas, dim=0).double().numpy()
    ts = np.arange(n_steps)[::-1] * (1000 // n_steps)  # 875, 750, ..., 0
    ab = abar[ts]
    ab_prev = np.array([abar[t - 1000 // n_steps] if t - 1000 // n_steps >= 0 else 1.0 for t in ts])
    A = np.sqrt(ab_prev / ab)
    B = np.sqrt(1 - ab_prev) - np.sqrt(ab_prev) * np.sqrt(1 - ab) / np.sqrt(ab)
    return A[1:] * B[:-1] / B[1:]


def test_m1_analytic_prev_is_rho_times_previous_K(fp_denoiser, ddim, latents):
    k = torch.tensor([0.05, -0.08, 0.12, 0.03])
    tab = fit_tables("tcec-m1-analytic", lambda x, t: (1 + k.view(1, C, 1, 1)) * fp_denoiser(x, t), fp_denoiser,
                     ddim, N_STEPS, latents)
    K = 1 - tab.scale[:N_STEPS].astype(np.float64)
    rho = _ddim_rho_by_hand(N_STEPS)
    assert torch.equal(torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000), 0), ddim.alphas_cumprod)
    assert np.all(np.abs(rho - 1) > 1e-3), rho  # rho = 1 would hide a missing factor
    err = np.abs(tab.prev[1:N_STEPS] - rho[:, None] * K[:-1]).max() / np.abs(tab.prev).max()
    print(f"m1-analytic: rho (by hand) {np.round(rho, 4)}; max rel |prev - rho K_prev| = {err:.1e} (float32 tables, "
          f"tolerance 1e-5)")
    assert np.all(tab.prev[0] == 0) and err < 1e-5 and tab.uses_state


def test_bad_options_are_user_errors(fp_denoiser, ddim, latents):
    with pytest.raises(UserError):
        FitOptions(target="nope")
    with pytest.raises(UserError):
        FitOptions(g=0.0)
    with pytest.raises(UserError):
        fit_tables("tcec-m7", fp_denoiser, fp_denoiser, ddim, 2, latents)
    with pytest.raises(UserError):
        fit_tables("tcec-m0", fp_denoiser, fp_denoiser, ddim, 2, latents, no_such_option=1)
