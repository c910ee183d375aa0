"""Every policy against its definition: the contract, brute force on small instances, bad inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_xshare import Budget, BudgetSchedule, Placement, RoutingSpec, SelectionConfig, Selector
from sglang_xshare.select import compute_scores
from sglang_xshare.select.common import greedy_pick, mass_units, resolve_budget

from .conftest import clustered_logits

POLICIES = ["topk", "cap", "oea", "oea_simple", "xshare", "xshare_ep", "xshare_spec"]


def make(policy: str, E: int, k: int, k0: int = 1, budget: str = "0.6", request_budget: str = "0.8",
         ep: int = 1, renormalize: bool = True, min_score: float = 0.0, scoring: str = "softmax") -> Selector:
    r = RoutingSpec(E, k, scoring=scoring, renormalize=renormalize)
    kw: dict = {}
    if policy == "cap":
        kw["cap"] = max(1, k // 2)
    if policy in ("xshare", "xshare_ep", "xshare_spec"):
        kw["budget"] = BudgetSchedule.parse(budget)
    if policy == "xshare_spec":
        kw["request_budget"] = Budget.parse(request_budget)
    cfg = SelectionConfig(policy=policy, k0=k0, min_score=min_score, **kw)
    placement = Placement.expert_parallel(E, ep) if ep > 1 else None
    return Selector(r, cfg, placement, backend="reference")


def own_floor(policy: str, sel: Selector) -> int:
    return {"topk": sel.routing.top_k, "cap": sel.config.cap}.get(policy, sel.config.k0)


def check_contract(sel: Selector, policy: str, logits: torch.Tensor, n_valid: int, rid: torch.Tensor | None = None):
    out = sel(logits, num_token_non_padded=n_valid, request_ids=rid)
    T, k = logits.shape[0], sel.routing.top_k
    ids, w = out.topk_ids, out.topk_weights
    assert ids.shape == (T, k) and ids.dtype == torch.int32
    assert w.shape == (T, k) and w.dtype == torch.float32
    assert torch.all(w[ids < 0] == 0)
    assert torch.all(ids[n_valid:] == -1)
    scores = compute_scores(logits, sel.routing)
    own = torch.sort(scores.sel, dim=1, descending=True, stable=True).indices
    floor = own_floor(policy, sel)
    for t in range(n_valid):
        kept = ids[t][ids[t] >= 0].tolist()
        assert len(kept) == len(set(kept)), "an expert twice in one token"
        assert set(own[t, :floor].tolist()) <= set(kept), f"token {t} lost part of its top-{floor}"
        # kept slots come first and best first
        n = len(kept)
        assert torch.all(ids[t, n:] == -1)
        vals = scores.sel[t, ids[t, :n].long()]
        assert torch.all(vals[:-1] >= vals[1:])
        if sel.routing.renormalize:
            assert math.isclose(float(w[t].sum()), 1.0, rel_tol=1e-5)
    again = sel(logits, num_token_non_padded=n_valid, request_ids=rid)
    assert torch.equal(again.topk_ids, ids) and torch.equal(again.topk_weights, w), "not deterministic"
    return out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("E,k,T", [(16, 2, 5), (64, 8, 33), (128, 4, 64), (160, 6, 17)])
def test_contract_random(policy, E, k, T):
    sel = make(policy, E, k, k0=min(2, k), ep=4 if policy == "xshare_ep" and E % 4 == 0 else 1)
    logits = clustered_logits(T, E, seed=E * 31 + T)
    rid = torch.arange(T) // 4
    check_contract(sel, policy, logits, n_valid=T, rid=rid)
    check_contract(sel, policy, logits, n_valid=max(T - 3, 0), rid=rid)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    T=st.integers(0, 24),
    E=st.sampled_from([8, 12, 32]),
    k=st.integers(1, 6),
    k0=st.integers(1, 6),
    budget=st.sampled_from(["1", "3", "0.3", "0.9", "mass:0.5", "mass:0.99", "mass:1"]),
    renorm=st.booleans(),
    sigmoid=st.booleans(),
    seed=st.integers(0, 10_000),
    pad=st.integers(0, 5),
    quantise=st.booleans(),
)
def test_contract_hypothesis(policy, T, E, k, k0, budget, renorm, sigmoid, seed, pad, quantise):
    k = min(k, E)
    k0 = min(k0, k)
    sel = make(policy, E, k, k0=k0, budget=budget, request_budget=budget, renormalize=renorm,
               scoring="sigmoid" if sigmoid else "softmax", ep=4 if policy == "xshare_ep" else 1)
    logits = clustered_logits(T, E, seed)
    if quantise:  # many exact ties
        logits = torch.round(logits)
    rid = torch.randint(0, max(T, 1), (T,), generator=torch.Generator().manual_seed(seed))
    check_contract(sel, policy, logits, n_valid=max(T - pad, 0), rid=rid)


# ---- the definitions, by brute force --------------------------------------------------------

def _topk_sets(scores, k):
    order = torch.sort(scores.sel, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def test_topk_is_plain_topk():
    logits = clustered_logits(40, 64, 1)
    out = make("topk", 64, 6)(logits)
    probs = torch.softmax(logits, -1)
    v, i = probs.topk(6)
    assert torch.equal(out.topk_ids, i.int())
    torch.testing.assert_close(out.topk_weights, v / v.sum(-1, keepdim=True))


def test_cap_keeps_top_kprime():
    logits = clustered_logits(20, 32, 2)
    out = make("cap", 32, 6)(logits)
    ref = make("topk", 32, 6)(logits)
    assert torch.equal(out.topk_ids[:, :3], ref.topk_ids[:, :3])
    assert torch.all(out.topk_ids[:, 3:] == -1)


@pytest.mark.parametrize("seed", range(6))
def test_oea_definition(seed):
    E, k, k0, T = 24, 4, 2, 12
    logits = clustered_logits(T, E, seed)
    scores = compute_scores(logits, RoutingSpec(E, k))
    top = _topk_sets(scores, E)
    active = set(top[:, :k0].flatten().tolist())
    full = make("oea", E, k, k0=k0)(logits).topk_ids
    simple = make("oea_simple", E, k, k0=k0)(logits).topk_ids
    for t in range(T):
        ranking = top[t].tolist()
        want_full = [e for e in ranking if e in active][:k]
        want_simple = [e for e in ranking[:k] if e in active]
        assert full[t][full[t] >= 0].tolist() == want_full
        assert simple[t][simple[t] >= 0].tolist() == want_simple


def _brute_best_mass(mass, warm, m_eff):
    """Max total mass over sets S with warm <= S, |S| <= m_eff (exhaustive)."""
    E = len(mass)
    free = [e for e in range(E) if e not in warm]
    best = sum(mass[e] for e in warm)
    base = best
    for r in range(0, max(m_eff - len(warm), 0) + 1):
        for extra in itertools.combinations(free, r):
            best = max(best, base + sum(mass[e] for e in extra))
    return best


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("budget", ["2", "5", "0.5", "mass:0.8"])
def test_xshare_greedy_is_exact(seed, budget):
    E, k, k0, T = 10, 3, 1, 6
    logits = clustered_logits(T, E, seed, clusters=2)
    sel = make("xshare", E, k, k0=k0, budget=budget)
    scores = compute_scores(logits, sel.routing)
    top = _topk_sets(scores, k)
    mass = [0.0] * E
    for t in range(T):
        for e in top[t].tolist():
            mass[e] += float(scores.gate[t, e])
    warm = set(top[:, :k0].flatten().tolist())
    out = sel(logits)
    chosen = set(out.topk_ids[out.topk_ids >= 0].tolist())
    m_eff = len(chosen)
    assert warm <= chosen
    if budget[0].isdigit() and "." not in budget:
        assert m_eff <= max(int(budget), len(warm))
    got = sum(mass[e] for e in chosen)
    assert got == pytest.approx(_brute_best_mass(mass, warm, m_eff), rel=1e-6)
    # refinement: each token's best <= k experts inside the chosen set, in its own order
    order = _topk_sets(scores, E)
    for t in range(T):
        want = [e for e in order[t].tolist() if e in chosen][:k]
        assert out.topk_ids[t][out.topk_ids[t] >= 0].tolist() == want


def test_budget_modes_on_device_tensors():
    mass = mass_units(torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0]]))
    warm = torch.tensor([[False, False, True, False, False]])
    union = mass > 0
    assert resolve_budget(Budget.parse(2), mass, warm, union).tolist() == [2]
    assert resolve_budget(Budget.parse("0.5"), mass, warm, union).tolist() == [2]  # ceil(0.5 * 4)
    assert resolve_budget(Budget.parse("0.7"), mass, warm, union).tolist() == [3]  # ceil(2.8)
    # warm (0.1) first, then 0.5 -> 0.6, then 0.3 -> 0.9 >= 0.85 * 1.0
    assert resolve_budget(Budget.parse("mass:0.85"), mass, warm, union).tolist() == [3]
    assert resolve_budget(Budget.parse("mass:1"), mass, warm, union).tolist() == [4]
    chosen = greedy_pick(mass, warm, torch.tensor([2]))
    assert chosen.tolist() == [[True, False, True, False, False]]
    # the warm-up floor overrides a smaller budget; zero-mass experts are never picked
    chosen = greedy_pick(mass, warm | torch.tensor([[True, True, False, False, False]]), torch.tensor([1]))
    assert chosen.tolist() == [[True, True, True, False, False]]
    assert greedy_pick(mass, warm, torch.tensor([5])).tolist() == [[True, True, True, True, False]]


def test_fraction_budget_rounding_is_stable():
    mass = mass_units(torch.ones(1, 10))
    warm = torch.zeros(1, 10, dtype=torch.bool)
    assert resolve_budget(Budget.parse("0.7"), mass, warm, mass > 0).tolist() == [7]  # not 8 (0.7*10 = 7.000000000000001)


@pytest.mark.parametrize("seed", range(5))
def test_xshare_spec_definition(seed):
    """Two-level selection written out with plain loops (an independent oracle)."""
    E, k, k0, T, per = 16, 4, 1, 12, 3
    logits = clustered_logits(T, E, seed)
    rid = torch.arange(T) // per
    sel = make("xshare_spec", E, k, k0=k0, budget="6", request_budget="4")
    scores = compute_scores(logits, sel.routing)
    order = _topk_sets(scores, E).tolist()

    def pick(mass: dict, warm: set, m: int) -> set:
        rest = sorted((e for e in mass if e not in warm and mass[e] > 0), key=lambda e: (-mass[e], e))
        return set(warm) | set(rest[: max(m - len(warm), 0)])

    S_r, batch_mass, warm_all = {}, {}, set()
    for r in sorted(set(rid.tolist())):
        toks = [t for t in range(T) if rid[t] == r]
        mass: dict[int, float] = {}
        warm = set()
        for t in toks:
            for j, e in enumerate(order[t][:k]):
                mass[e] = mass.get(e, 0.0) + float(scores.gate[t, e])
                if j < k0:
                    warm.add(e)
        S_r[r] = pick(mass, warm, 4)
        warm_all |= warm
        for e in S_r[r]:
            batch_mass[e] = batch_mass.get(e, 0.0) + mass.get(e, 0.0)
    S = pick(batch_mass, warm_all, 6)
    out = sel(logits, request_ids=rid)
    for t in range(T):
        allowed = S_r[int(rid[t])] & S
        want = [e for e in order[t] if e in allowed][:k]
        assert out.topk_ids[t][out.topk_ids[t] >= 0].tolist() == want


def test_min_score_floor():
    logits = clustered_logits(16, 32, 3)
    loose = make("xshare", 32, 6, k0=2, budget="0.8")(logits)
    strict = make("xshare", 32, 6, k0=2, budget="0.8", min_score=0.2)(logits)
    gate = torch.softmax(logits, -1)
    for t in range(16):
        kept = strict.topk_ids[t][strict.topk_ids[t] >= 0].long()
        assert len(kept) >= 2
        assert torch.all(gate[t, kept[2:]] >= 0.2)
        assert set(kept.tolist()) <= set(loose.topk_ids[t].tolist())


# ---- bad inputs at run time -----------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_nan_inf_empty_padded_ties(policy):
    E, k = 16, 4
    sel = make(policy, E, k, k0=2, ep=4 if policy == "xshare_ep" else 1)
    x = clustered_logits(8, E, 0)
    x[0] = float("nan")
    x[1, :3] = float("inf")
    x[2] = float("-inf")
    x[3, 5] = float("nan")
    x[4] = 0.0  # all tied
    out = check_contract(sel, policy, x, n_valid=8)
    assert torch.isfinite(out.topk_weights).all()
    assert (out.topk_ids[:, 0] >= 0).all(), "a valid token was left with no expert"
    assert out.topk_ids[4, :2].tolist() == [0, 1], "ties must go to the lower expert id"
    assert set(out.topk_ids[1, :2].tolist()) <= {0, 1, 2}
    empty = sel(torch.empty(0, E))
    assert empty.topk_ids.shape == (0, k)
    padded = sel(x, num_token_non_padded=torch.tensor(0))
    assert torch.all(padded.topk_ids == -1) and torch.all(padded.topk_weights == 0)
    for dt in (torch.bfloat16, torch.float16):
        check_contract(sel, policy, x.to(dt), n_valid=6)


def test_padding_does_not_change_the_selection():
    """Padded slots (whatever garbage they hold) must not influence the valid tokens."""
    E, k, T = 32, 4, 10
    x = clustered_logits(T, E, 5)
    for policy in POLICIES:
        sel = make(policy, E, k, k0=1, ep=4 if policy == "xshare_ep" else 1)
        a = sel(x, num_token_non_padded=7)
        y = x.clone()
        y[7:] = torch.randn(3, E) * 50
        b = sel(y, num_token_non_padded=7)
        assert torch.equal(a.topk_ids, b.topk_ids), policy
        assert torch.equal(a.topk_weights, b.topk_weights), policy


@pytest.mark.parametrize("policy", POLICIES)
def test_invariants_large(policy):
    """Vectorised invariant checks on a decode batch of real-model size."""
    T, E, k, k0 = 512, 256, 8, 2
    sel = make(policy, E, k, k0=k0, budget="0.5", request_budget="12", ep=8 if policy == "xshare_ep" else 1)
    logits = clustered_logits(T, E, seed=99, clusters=6)
    rid = torch.arange(T) // 4
    out = sel(logits, num_token_non_padded=T - 7, request_ids=rid)
    ids = out.topk_ids.long()
    valid = torch.arange(T) < T - 7
    own = torch.sort(compute_scores(logits, sel.routing).sel, dim=1, descending=True, stable=True).indices
    floor = own_floor(policy, sel)
    has = torch.zeros(T, E + 1, dtype=torch.bool).scatter_(1, torch.where(ids >= 0, ids, E), True)[:, :E]
    assert torch.all(has.gather(1, own[:, :floor])[valid]), "a token lost its floor"
    assert torch.all(ids[~valid] == -1)
    assert torch.all(has.sum(1) == (ids >= 0).sum(1)), "duplicate expert in a token"
    w = out.topk_weights
    torch.testing.assert_close(w[valid].sum(1), torch.ones(int(valid.sum())))
    if policy in ("xshare", "xshare_ep", "oea", "oea_simple", "xshare_spec"):
        assert torch.unique(ids[ids >= 0]).numel() < torch.unique(own[valid, :k]).numel()


def test_request_group_equals_request_ids():
    """``request_group=g`` is the grouping ``t // g`` (the last request may be shorter)."""
    sel = make("xshare_spec", 64, 8, budget="0.7", request_budget="0.8")
    for T, g in ((24, 4), (22, 3), (9, 1)):
        x = clustered_logits(T, 64, seed=T + g)
        a = sel(x, request_group=g, num_token_non_padded=T - 1)
        b = sel(x, request_ids=torch.arange(T) // g, num_token_non_padded=T - 1)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)
    with pytest.raises(ValueError, match="not both"):
        sel(clustered_logits(8, 64, seed=1), request_ids=torch.arange(8) // 4, request_group=4)
    with pytest.raises(ValueError, match=">= 1"):
        sel(clustered_logits(8, 64, seed=1), request_group=0)


def test_masses_do_not_depend_on_token_order():
    """Masses are exact int64 sums of fixed-point units: the same integers for any order of the
    tokens, so equal masses stay equal and ties break the same way in any implementation."""
    from sglang_xshare.select.common import MASS_BITS, exact_sum, group_mass

    g = torch.Generator().manual_seed(5)
    gate = torch.rand(257, 64, generator=g) ** 3 * (10.0 ** -torch.randint(0, 30, (257, 64), generator=g)).float()
    contrib = mass_units(gate)
    assert contrib.dtype == torch.int64
    perm = torch.randperm(257, generator=g)
    assert torch.equal(group_mass(contrib, None, 1), group_mass(contrib[perm], None, 1))
    rid = torch.randint(0, 40, (257,), generator=g)
    assert torch.equal(group_mass(contrib, rid, 257), group_mass(contrib[perm], rid[perm], 257))
    assert torch.equal(exact_sum(contrib, 0), exact_sum(contrib.flip(0), 0))
    # floor(gate * 2^40), not rounding: gates below 2^-40 contribute nothing, 1.0 contributes 2^40
    units = torch.tensor([2.0**-41, 0.75 * 2.0**-40, 2.0**-40, 2.75 * 2.0**-40, 0.75, 1.0])
    assert mass_units(units).tolist() == [0, 0, 1, 2, 3 << 38, 1 << MASS_BITS]


def test_an_expert_below_one_unit_is_never_chosen():
    """An expert in every token's top-k whose gates are all below one mass unit (``2**-40``) has
    zero mass: ``xshare`` never chooses it, however large the budget (no token needs it)."""
    logits = torch.full((4, 8), -100.0)
    logits[:, 0] = 0.0
    logits[:, 1] = -28.3  # gate ~5e-13: 0.5 to 1 unit
    gate = compute_scores(logits, RoutingSpec(8, 2)).gate[:, 1]
    assert bool(((gate * 2.0**40 > 0.5) & (gate * 2.0**40 < 1.0)).all()), gate
    sel = Selector(RoutingSpec(8, 2), SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse("8")),
                   backend="reference")
    assert sel(logits).topk_ids.tolist() == [[0, -1]] * 4


def _midpoint_selector(policy: str, budget: str = "3") -> Selector:
    kw: dict = {"budget": BudgetSchedule.parse(budget)}
    if policy == "xshare_spec":
        kw["request_budget"] = Budget.parse("2")
    placement = Placement.expert_parallel(8, 2) if policy == "xshare_ep" else None
    kw["hard_cap"] = policy == "xshare_ep"  # the count is a cap: the same sets as xshare here
    return Selector(RoutingSpec(8, 2), SelectionConfig(policy=policy, k0=1, **kw), placement, backend="reference")


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "xshare_spec"])
def test_midpoint_counter_example_is_order_independent(policy):
    """The float64 counter-example: experts 2 and 5 tie but for two gates of ~5e-17 on 5. A
    float64 sum rounded to float32 picked {2, 6, 7} or {5, 6, 7} depending on the token order;
    fixed-point masses drop the 5e-17 gates and keep the tie (lower id: expert 2), in every order
    -- and count gates down to 2^-40 (the "dust" inputs), in every order."""
    import itertools

    from sglang_xshare.select.inputs import make_logits

    # "midpoint": the ~5e-17 gates are below 2^-40 (tie, 2 wins); "dust": masses of tiny gates
    # around the resolution (1 > 0 > 3 = 0 units: 3 never picked)
    for kind, budget, want in (("midpoint", "3", [2, 6, 7]), ("dust", "3", [1, 6, 7]), ("dust", "5", [0, 1, 6, 7])):
        sel = _midpoint_selector(policy, budget)
        x = make_logits(kind, 6, 8, 0)
        base = sel(x)
        assert sorted(set(base.topk_ids[base.topk_ids >= 0].tolist())) == want, kind
        for perm in itertools.permutations(range(6)):
            p = torch.tensor(perm)
            out = sel(x[p]) if policy != "xshare_spec" else sel(x[p], request_ids=torch.arange(6))
            assert torch.equal(out.topk_ids, base.topk_ids[p]), (kind, perm)
            assert torch.equal(out.topk_weights, base.topk_weights[p]), (kind, perm)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "xshare_spec", "oea"])
def test_dynamic_range_masses_are_order_independent(policy, seed):
    """Gates from 1e-30 to 1 with exact mass ties and sub-resolution dust: any token order (and
    any request order / grouping) gives the same selection, bit for bit."""
    from sglang_xshare.select.inputs import make_logits

    T, E = 24, 16
    g = torch.Generator().manual_seed(seed)
    sel = make(policy, E, 4, k0=1, budget=["3", "0.5", "mass:0.9", "mass:0.97"][seed % 4],
               request_budget=["4", "0.8"][seed % 2], ep=4 if policy == "xshare_ep" else 1,
               scoring="sigmoid" if seed % 3 == 2 else "softmax")
    if policy == "xshare_ep" and seed % 2:
        sel = Selector(sel.routing, sel.config, Placement.from_map(E, 4, list(range(E)) + [0, 5, 9, 14]),
                       backend="reference")
    x = make_logits("range", T, E, seed)
    rid = torch.randint(0, 6, (T,), generator=g)
    base = sel(x, request_ids=rid if policy == "xshare_spec" else None)
    for _ in range(4):
        p = torch.randperm(T, generator=g)
        out = sel(x[p], request_ids=rid[p] if policy == "xshare_spec" else None)
        assert torch.equal(out.topk_ids, base.topk_ids[p])
        assert torch.equal(out.topk_weights, base.topk_weights[p])
        if base.physical_ids is not None:
            assert torch.equal(out.physical_ids, base.physical_ids[p])


@pytest.mark.parametrize("policy", POLICIES)
def test_sigmoid_underflow_gives_uniform_weights(policy):
    """Sigmoid gates that all underflow to 0: renormalised weights are 1/n on the n kept slots
    (contract), not all zeros; tokens with normal gates are unaffected."""
    E, k = 16, 4
    sel = make(policy, E, k, k0=2, scoring="sigmoid", ep=4 if policy == "xshare_ep" else 1)
    x = clustered_logits(6, E, 4)
    x[::2] -= 130.0
    out = check_contract(sel, policy, x, n_valid=6)
    assert torch.all(torch.sigmoid(x[::2]) == 0)
    for t in range(0, 6, 2):
        kept = out.topk_ids[t] >= 0
        n = int(kept.sum())
        assert n >= 1 and torch.all(out.topk_weights[t][kept] == 1.0 / n)
    assert torch.all(out.topk_weights[1::2].sum(1) > 0.99)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hard", [False, True])
def test_xshare_ep_with_replicas_end_to_end(seed, hard):
    """xshare_ep on an EPLB-style placement with replicas against an independent oracle: masses
    summed with Python loops (fixed-point), the replica greedy written out
    (tests.test_ilp_oracle.greedy_by_definition), then each token's best <= k experts inside the
    chosen set, each on the chosen copy."""
    from .test_ilp_oracle import greedy_by_definition

    E, k, T, R = 16, 4, 10, 4
    g = torch.Generator().manual_seed(seed)
    p2l = torch.cat([torch.randperm(E, generator=g), torch.randint(0, E, (R,), generator=g)])
    placement = Placement.from_map(E, R, p2l)
    cfg = SelectionConfig(policy="xshare_ep", k0=1, budget=BudgetSchedule.parse("6"), hard_cap=hard)
    sel = Selector(RoutingSpec(E, k), cfg, placement, backend="reference")
    logits = clustered_logits(T, E, seed)
    out = sel(logits)
    scores = compute_scores(logits, sel.routing)
    order = _topk_sets(scores, E).tolist()
    mass = [0] * E
    warm = [False] * E
    for t in range(T):
        for j, e in enumerate(order[t][:k]):
            mass[e] += int(mass_units(scores.gate[t, e]))
            warm[e] = warm[e] or j == 0
    copy = greedy_by_definition(mass, warm, 6, p2l.tolist(), R, True, hard)
    chosen = {e for e in range(E) if copy[e] >= 0}
    assert chosen != {e for e in range(E) if warm[e]}, "the case must choose beyond the warm-up set"
    for t in range(T):
        want = [e for e in order[t] if e in chosen][:k]
        kept = out.topk_ids[t] >= 0
        assert out.topk_ids[t][kept].tolist() == want
        assert out.physical_ids[t][kept].tolist() == [copy[e] for e in want]


@pytest.mark.parametrize("budget", ["0.6", "mass:0.9", "5"])
@pytest.mark.parametrize("grouping", ["ids", "group", "none"])
def test_xshare_spec_default_is_xshare_bit_for_bit(budget, grouping):
    """No request budget (the default): no request stage, the batch budget over the union = xshare."""
    E, k, T = 32, 4, 24
    r = RoutingSpec(E, k)
    spec = Selector(r, SelectionConfig(policy="xshare_spec", k0=1, budget=BudgetSchedule.parse(budget)).validate(r),
                    backend="reference")
    plain = Selector(r, SelectionConfig(policy="xshare", k0=1, budget=BudgetSchedule.parse(budget)), backend="reference")
    logits = clustered_logits(T, E, seed=7)
    kw = {"ids": {"request_ids": torch.arange(T) // 4}, "group": {"request_group": 4}, "none": {}}[grouping]
    for n_valid in (T, T - 5):
        a = spec(logits, num_token_non_padded=n_valid, **kw)
        b = plain(logits, num_token_non_padded=n_valid)
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)
    # an explicit request budget is a real request stage (it changes the selection here)
    tight = Selector(r, SelectionConfig(policy="xshare_spec", k0=1, budget=BudgetSchedule.parse(budget),
                                        request_budget=Budget.parse("2")), backend="reference")
    assert not torch.equal(tight(logits, request_ids=torch.arange(T) // 4).topk_ids, plain(logits).topk_ids)
