"""KV cache and generation: cached decoding equals recomputing the full sequence; greedy and sampling against
slow step-by-step references; routing traces; experts touched per batch."""
import math

import pytest
import torch

from moe_lab.calculator import expected_experts_touched
from moe_lab.inference import decode_step_seconds, experts_touched, record_routing
from moe_lab.model import Attention, KVCache, MoETransformer, rope, toy_config

DROPLESS = ["dense", "mixtral", "glam", "deepseek_v1", "deepseek_v3"]


def small(name: str, **overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(toy_config(name, d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, **overrides)).eval()


@pytest.mark.parametrize("name", DROPLESS)
def test_cached_decoding_gives_the_logits_of_the_full_sequence(name):
    model = small(name)
    tokens = torch.randint(0, 256, (3, 14))
    full = model(tokens)[0]  # one forward over the whole sequence (causal): the reference
    cache = model.new_cache(3, 14)
    pieces = [model(tokens[:, :5], cache)[0]]  # prefill 5, then chunks of 1, 3, 1, ...
    t = 5
    for size in (1, 3, 1, 1, 2, 1):
        pieces.append(model(tokens[:, t:t + size], cache)[0])
        t += size
    assert t == 14 and cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)


def test_attention_with_cache_matches_a_slow_reference():
    torch.manual_seed(1)
    attn = Attention(16, 4, 2)
    x = torch.randn(2, 7, 16)
    cache = KVCache(1, 2, 2, 4, 7)
    first = attn(x[:, :3], cache, 0)
    cache.length = 3  # the model's forward advances the length once all layers have their keys
    out = torch.cat([first, attn(x[:, 3:], cache, 0)], 1)
    # reference: per query position, softmax over keys 0..t with explicit rotations and repeated kv heads
    q = rope(attn.q(x).view(2, 7, 4, 4).transpose(1, 2))
    k = rope(attn.k(x).view(2, 7, 2, 4).transpose(1, 2)).repeat_interleave(2, 1)
    v = attn.v(x).view(2, 7, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    rows = []
    for t in range(7):
        w = (q[:, :, t:t + 1] @ k[:, :, : t + 1].transpose(-1, -2) / 2.0).softmax(-1)
        rows.append(w @ v[:, :, : t + 1])
    ref = attn.o(torch.cat(rows, 2).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert cache.bytes_per_token() == 2 * 2 * 4 * 4  # keys + values, 2 kv heads of 4, float32


def test_rope_offset_continues_positions():
    x = torch.randn(1, 2, 9, 8)
    torch.testing.assert_close(rope(x)[:, :, 4:], rope(x[:, :, 4:], offset=4))


@pytest.mark.parametrize("name", DROPLESS)
def test_greedy_generation_equals_argmax_of_full_recompute(name):
    model = small(name)
    prompt = torch.randint(0, 256, (2, 4))
    out = model.generate(prompt, 6)
    seq = prompt  # slow reference: the whole sequence through the model at every step
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(prompt, 6, use_cache=False), seq)


def test_sampling_draws_from_the_tempered_top_k_distribution():
    model = small("mixtral")
    prompt = torch.randint(0, 256, (1, 3))
    a = model.generate(prompt, 5, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 5, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 8)
    # reference draw for the first new token, with the same generator state
    logits = model(prompt)[0][:, -1] / 0.8
    top = logits.topk(4, -1)
    probs = torch.full_like(logits, 0.0).scatter(1, top.indices, top.values.softmax(-1))
    ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))
    assert a[0, 3] == ref[0, 0] and a[0, 3] in top.indices
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(prompt, 5, temperature=2.0, top_k=1), model.generate(prompt, 5))


def test_generate_keeps_the_training_mode_and_validates():
    model = small("mixtral").train()
    prompt = torch.randint(0, 256, (1, 3))
    model.generate(prompt, 2)
    assert model.training
    for kwargs, word in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2, temperature=-1), "temperature"),
                         (dict(max_new_tokens=2, temperature=1.0, top_k=0), "top_k"),
                         (dict(max_new_tokens=2, top_k=257), "top_k")]:
        with pytest.raises(ValueError, match=word):
            model.generate(prompt, **kwargs)
    with pytest.raises(ValueError, match="idx"):
        model.generate(prompt.float(), 2)
    cache = model.new_cache(1, 4)
    model(prompt, cache)
    with pytest.raises(ValueError, match="max_len=4"):
        model(prompt, cache)
    with pytest.raises(ValueError, match="batch=1"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(1, 1, 1, 4, 0)


def test_capacity_at_eval_makes_cached_decoding_differ_from_recompute():
    # Switch preset: capacity factor 1.0 also at eval, so the prefill drops tokens that a one-token decode step
    # keeps. Dropless eval (eval_capacity_factor=None) restores the equality.
    prompt = torch.randint(0, 256, (4, 24))
    model = small("switch")
    full = model(prompt)[0]
    cache = model.new_cache(4, 24)
    stepwise = torch.cat([model(prompt[:, :1], cache)[0]] + [model(prompt[:, t:t + 1], cache)[0] for t in range(1, 24)], 1)
    assert (stepwise - full).abs().max() > 1e-3
    for block in model.blocks:
        block.ffn.configure(eval_capacity_factor=None)
    cache = model.new_cache(4, 24)
    stepwise = torch.cat([model(prompt[:, t:t + 1], cache)[0] for t in range(24)], 1)
    torch.testing.assert_close(stepwise, model(prompt)[0], rtol=0, atol=1e-5)


def test_routing_trace_records_every_call_and_layer():
    model = small("mixtral")
    prompt = torch.randint(0, 256, (2, 5))
    with record_routing(model) as trace:
        tokens = model.generate(prompt, 4)
    assert trace.num_layers == 3 and (trace.num_experts, trace.k) == (8, 2)
    assert [tuple(e.shape) for e in trace.experts[0]] == [(2, 5, 2)] + [(2, 1, 2)] * 3  # prefill + 3 decode calls
    assert trace.guesses[0] == [] and len(trace.guesses[1]) == 4
    # the trace holds exactly what the layers returned in a plain forward of the same tokens (prefill call)
    infos = model(prompt)[1]
    for layer, info in enumerate(infos):
        assert torch.equal(trace.experts[layer][0].reshape(-1, 2), info.experts)
    steps = trace.steps(1)
    assert len(steps) == 3 and all(s == sorted(set(s)) and 2 <= len(s) <= 4 for s in steps)
    assert len(trace.steps(1, decode_only=False)) == 4
    for c, step in enumerate(trace.steps(1, sequence=1)):  # one sequence alone: its own k experts
        assert step == sorted(trace.experts[1][c + 1][1, 0].tolist())
    both = [trace.simulate(2, sequence=b) for b in (0, 1)]
    assert both[0].accesses + both[1].accesses == 3 * 3 * 2 * 2  # layers x decode steps x sequences x k
    with pytest.raises(ValueError, match="sequence"):
        trace.steps(0, sequence=2)
    # an evaluation pass over the generated text, split per position, is the generation's routing
    with record_routing(model) as evaluation:
        model(tokens[:, :-1])
    replay = evaluation.per_position()
    for layer in range(3):
        prefill = [sorted(trace.experts[layer][0][1, t].tolist()) for t in range(5)]
        assert replay.steps(layer, sequence=1) == prefill + trace.steps(layer, sequence=1)
        expected = None if layer == 0 else [g[0, t].tolist() for g in trace.guesses[layer] for t in range(g.shape[1])]
        assert replay.guess_steps(layer, sequence=0) == expected
    assert trace.tokens(0).shape == (2 * 5 + 2 * 3, 2)
    # guesses: layer 1's router on layer 0's MoE input, top-2 of the softmax
    h = {}
    handle = model.blocks[0].ffn.register_forward_pre_hook(lambda m, a: h.setdefault("x", a[0]))
    model(prompt)
    handle.remove()
    expected = model.blocks[1].ffn.router(h["x"].reshape(-1, 32)).topk(2, -1).indices
    assert torch.equal(trace.guesses[1][0].reshape(-1, 2), expected)
    recall = trace.guess_recall(1)
    assert 0 <= recall <= 1
    with pytest.raises(ValueError, match="no guesses"):
        trace.guess_recall(0)
    with pytest.raises(ValueError, match="no MoE layer"):
        with record_routing(small("dense")):
            pass


def test_experts_touched_matches_the_formula_under_uniform_routing():
    g = torch.Generator().manual_seed(0)
    e, k = 16, 2
    experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(4000)])  # uniform top-k
    for batch in (1, 4, 16, 64):
        measured = experts_touched(experts, e, batch, samples=400, generator=g)
        assert math.isclose(measured, expected_experts_touched(e, k, batch), rel_tol=0.03)
    assert experts_touched(torch.tensor([[3, 1], [3, 1]]), 4, 2) == 2.0  # always the same two experts
    with pytest.raises(ValueError, match="batch"):
        experts_touched(experts, e, 0)


def test_decode_step_seconds_runs():
    assert decode_step_seconds(small("mixtral"), 2, 4, steps=2) > 0
