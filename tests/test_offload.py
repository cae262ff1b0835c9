"""Expert offloading: the cache policies against slow references written from their definitions, the offloaded
model's outputs identical to the model's, real copies and bytes counted, prefetch, and bad arguments."""
import random

import pytest
import torch

from moe_lab.inference import record_routing
from moe_lab.model import MoETransformer, toy_config
from moe_lab.offload import ExpertCache, OffloadedExperts, guess_experts, offload_experts, prefetch_order, simulate_cache


def lru_reference(steps, capacity):
    """LRU by its stack property: an expert is a hit iff it is among the ``capacity`` most recently used distinct
    experts when the step starts (recency within a step: its hits, then its misses, each in id order)."""
    history, hits = [], []
    for needed in steps:
        needed = sorted(set(needed))
        recent = list(dict.fromkeys(reversed(history)))[:capacity]
        hit = [e for e in needed if e in recent]
        hits += [e in recent for e in needed]
        history += hit + [e for e in needed if e not in recent]
    return hits


def lfu_reference(steps, capacity):
    """LFU recomputed from the whole history at every eviction: fewest past steps using the expert, then the
    oldest last use; experts of the current step are evicted only when nothing else is resident."""
    history, resident, hits = [], set(), []  # history: (time, expert) of every use

    def freq(e):
        return sum(1 for _, x in history if x == e)

    def last(e):
        return max((t for t, x in history if x == e), default=-1)

    for needed in steps:
        needed = sorted(set(needed))
        hit = [e for e in needed if e in resident]
        hits += [e in resident for e in needed]
        for e in hit:
            history.append((len(history), e))
        for e in [e for e in needed if e not in hit]:  # a hit evicted later in its own step has already run
            if len(resident) == capacity:
                others = [x for x in resident if x not in needed] or list(resident)
                resident.remove(min(others, key=lambda x: (freq(x), last(x))))
            resident.add(e)
            history.append((len(history), e))
    return hits


def hits_of(steps, capacity, policy):
    cache = ExpertCache(8, capacity, policy)
    out = []
    for needed in steps:
        loads = {e for e, _, load in cache.step(needed) if load}
        out += [e not in loads for e in sorted(set(needed))]
    return out


@pytest.mark.parametrize("policy,reference", [("lru", lru_reference), ("lfu", lfu_reference)])
def test_cache_policies_match_slow_references(policy, reference):
    rng = random.Random(0)
    for trial in range(60):
        capacity = rng.randint(1, 8)
        steps = [rng.sample(range(8), rng.randint(1, 4)) for _ in range(rng.randint(1, 30))]
        if trial % 3 == 0:  # skewed, repeating routing, as trained models produce
            steps = [rng.choice([[0, 1], [0, 2], [1, 3], [0, 1, 5]]) for _ in range(20)]
        assert hits_of(steps, capacity, policy) == reference(steps, capacity), (capacity, steps)


def test_cache_edge_cases():
    # a full cache (C = E) misses only the first use of each expert
    steps = [[0, 1], [2, 3], [0, 3], [1, 7], [7, 0]]
    assert simulate_cache(steps, 8, 8).hits == 5  # 10 accesses, 5 distinct experts
    # LRU and LFU differ: expert 0 is used often, then a scan of others
    steps = [[0], [0], [0], [1], [2], [0]]
    assert simulate_cache(steps, 8, 2, "lru").hits == 2
    assert simulate_cache(steps, 8, 2, "lfu").hits == 3
    # a step needing more experts than slots: every one is loaded; the plan runs hits first
    cache = ExpertCache(4, 2, "lru")
    cache.step([0, 1])
    plan = cache.step([3, 2, 1])
    assert [(e, load) for e, _, load in plan] == [(1, False), (2, True), (3, True)]
    assert plan[1][1] != plan[0][1]  # expert 2 did not take the slot of expert 1 (used by this step)
    assert cache.stats.accesses == 5 and cache.stats.loads == 4 and cache.stats.hit_rate == 0.2
    assert cache.resident() == [2, 3]
    # repeats inside a step count once
    assert simulate_cache([[1, 1, 1]], 4, 1).accesses == 1


def test_prefetch_loads_guesses_without_evicting_each_other():
    cache = ExpertCache(8, 2, "lfu")
    cache.step([0, 1])
    cache.step([0, 1])
    loads = cache.prefetch([4, 5, 6])  # at most C guesses kept
    assert sorted(e for e, _ in loads) == [4, 5] and cache.resident() == [4, 5]
    cache.step([4, 7])
    assert cache.stats.prefetch_hits == 1 and cache.stats.prefetch_loads == 2
    assert simulate_cache([[1, 2], [1, 2]], 4, 2, guesses=[[1, 2], [3, 0]]).hits == 2
    with pytest.raises(ValueError, match="guesses"):
        simulate_cache([[1]], 4, 2, guesses=[])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="capacity"):
        ExpertCache(8, 0)
    with pytest.raises(ValueError, match="capacity"):
        ExpertCache(8, 9)
    with pytest.raises(ValueError, match="policy"):
        ExpertCache(8, 2, "fifo")
    with pytest.raises(ValueError, match="experts"):
        ExpertCache(8, 2).step([8])
    model = MoETransformer(toy_config("mixtral", n_layers=2))
    with pytest.raises(ValueError, match="capacity"):
        with offload_experts(model, 0):
            pass
    model.blocks[0].ffn.configure(dispatch="loop")
    with pytest.raises(ValueError, match="dispatch"):
        with offload_experts(model, 2):
            pass


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "glam"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_model_gives_identical_outputs(name, policy, prefetch, device):
    torch.manual_seed(0)
    model = MoETransformer(toy_config(name, n_layers=3)).to(device).eval()
    prompt = torch.randint(0, 256, (2, 6), device=device)
    tokens = model.generate(prompt, 8)
    logits = model(tokens)[0]
    with record_routing(model) as trace:
        model.generate(prompt, 8)
    for capacity in (1, 3, model.cfg.num_experts):
        with offload_experts(model, capacity, policy, prefetch=prefetch) as off:
            assert torch.equal(model.generate(prompt, 8), tokens)
            stats, loaded, prefetched = off.stats, off.bytes_loaded, off.bytes_prefetched
            assert torch.equal(model(tokens)[0], logits)
        # the runtime cache saw exactly the trace's steps (prefill included)
        assert stats == trace.simulate(capacity, policy, prefetch=prefetch, decode_only=False)
        assert loaded == stats.loads * off.layers[0].expert_bytes
        assert prefetched == stats.prefetch_loads * off.layers[0].expert_bytes
        if capacity == model.cfg.num_experts and not prefetch:
            assert stats.loads <= capacity * len(off.layers)  # only cold misses
    assert all(type(b.ffn.experts).__name__ == "Experts" for b in model.blocks if hasattr(b.ffn, "experts"))


def test_offloaded_experts_copy_weights_from_a_separate_store():
    torch.manual_seed(0)
    model = MoETransformer(toy_config("mixtral", n_layers=1)).eval()
    experts = model.blocks[0].ffn.experts
    off = OffloadedExperts(experts, 2)
    assert off.store["w1"].data_ptr() != experts.w1.data_ptr() and torch.equal(off.store["w1"], experts.w1)
    x = torch.randn(5, 64)
    counts = torch.tensor([2, 0, 0, 3, 0, 0, 0, 0])
    out = off.forward_grouped(x, counts)
    ref = torch.cat([experts.forward_one(0, x[:2]), experts.forward_one(3, x[2:])])
    assert torch.equal(out, ref)
    assert off.bytes_loaded == 2 * 3 * 64 * 128 * 4  # two experts, three [64, 128] float32 matrices
    slot = off.cache.slot[3]
    assert torch.equal(off.resident.w2[slot], experts.w2[3])  # a real copy sits in the slot
    scaled = off.forward_grouped(x, counts, scale=torch.full((5,), 0.5))
    assert torch.equal(scaled, ref * 0.5) and off.bytes_loaded == 2 * 3 * 64 * 128 * 4  # both were hits
    assert torch.equal(off.forward_one(5, x), experts.forward_one(5, x))


def test_guess_experts_uses_the_next_router_and_bias():
    torch.manual_seed(0)
    model = MoETransformer(toy_config("deepseek_v3", n_layers=3)).eval()
    layer = model.blocks[2].ffn
    layer.expert_bias.copy_(torch.linspace(-1, 1, 32))
    h = torch.randn(4, 64)
    scores = (h @ layer.router.weight.T).sigmoid() + layer.expert_bias
    assert torch.equal(guess_experts(layer, h), scores.topk(layer.k, -1).indices)
    assert prefetch_order(torch.tensor([[3, 1], [1, 2], [1, 3]])) == [1, 3, 2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloading_copies_from_pinned_host_memory():
    model = MoETransformer(toy_config("mixtral", n_layers=2)).cuda().eval()
    prompt = torch.randint(0, 256, (1, 4), device="cuda")
    tokens = model.generate(prompt, 4)
    with offload_experts(model, 2) as off:
        assert off.layers[0].store["w1"].is_pinned() and off.layers[0].resident.w1.is_cuda
        assert torch.equal(model.generate(prompt, 4), tokens)
        assert off.bytes_loaded > 0
