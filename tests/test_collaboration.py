"""Collaboration measures: attention shares from the backends' merge statistics, and duplication."""

import json

import pytest
import torch

from hogwild.cache import SharedCache
from hogwild.engine import collaboration as collab
from hogwild.engine.engine import Engine
from hogwild.engine.events import CollabEvent, DoneEvent, HistoryStep
from hogwild.engine.runner import WorkerStep, plan_pass
from hogwild.layers.backends import get_backend
from hogwild.protocol.layouts import SharedBlocks
from hogwild.protocol.prompts import ProtocolConfig

HEAD_DIM, KV_HEADS, GROUPS, LAYERS = 64, 2, 2, 2
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
QUESTION = "Quick check: am I doing redundant work? (yes/no): "


def shares_of(backend, lengths, views, n_new, zero_keys=False, seed=0, device="cpu"):
    """Run one synthetic pass (LAYERS layers) on ``backend``; returns per row float32 [layers, entries].

    lengths: block name -> keys already held; views: per row, block names (its own block last);
    n_new: per row, new tokens. zero_keys: every key is 0 (all scores equal). Random numbers come
    from a CPU generator, then move to ``device``.
    """
    g = torch.Generator().manual_seed(seed)
    cache = SharedCache(LAYERS, KV_HEADS, HEAD_DIM, INV_FREQ, capacity_tokens=2048, page_size=4, device=device)
    blocks = {}
    for name, n in lengths.items():
        blocks[name] = block = cache.new_block(name)
        cache.reserve(block, n)
        for layer in range(LAYERS):
            k = torch.randn(KV_HEADS, n, HEAD_DIM, generator=g) * (not zero_keys)
            cache.write(block, layer, 0, k.to(device), torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).to(device))
        cache.commit(block, [0] * n)
    steps = [WorkerStep([0] * n, [blocks[b] for b in view]) for view, n in zip(views, n_new, strict=True)]
    plan = plan_pass(steps, cache, HEAD_DIM**-0.5, torch.float32, 10_000, backend=get_backend(backend), groups=GROUPS,
                     collab_stats=True)
    query = torch.randn(len(steps), KV_HEADS * GROUPS, plan.T, HEAD_DIM, generator=g).to(device)
    key = (torch.randn(len(steps), KV_HEADS, plan.T, HEAD_DIM, generator=g) * (not zero_keys)).to(device)
    for i, row in enumerate(plan.rows):
        for layer in range(LAYERS):
            cache.write(row.write, layer, row.start, key[i, :, : row.n_new], key[i, :, : row.n_new] + 1)
    for layer in range(LAYERS):
        plan.backend.forward(plan, layer, query, key, key, HEAD_DIM**-0.5)
    return plan.stats.row_shares(plan.rows)


BACKENDS = ("torch", "reference", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_keys_share_by_length(backend, device):
    """All keys 0: every visible key gets the same weight, so a block's share is its length over the view's."""
    lengths = {"prompt": 37, "a": 5, "b": 12, "empty": 0, "own0": 3, "own1": 0}
    views = [["prompt", "a", "empty", "b", "a", "own0"], ["prompt", "b", "own1"]]
    shares = shares_of(backend, lengths, views, [1, 1], zero_keys=True, device=device)
    seen = [[37, 5, 0, 12, 5, 4], [37, 12, 1]]  # the own block shows its new token too
    for row, counts in zip(shares, seen, strict=True):
        expected = torch.tensor(counts, dtype=torch.float32) / sum(counts)
        torch.testing.assert_close(row, expected.expand(LAYERS, -1), atol=1e-6, rtol=0)


def test_backends_agree_and_rows_sum_to_one(device):
    """Random keys, several new tokens (causal within the own block), a block seen twice, a long block."""
    lengths = {"prompt": 70, "h": 9, "w0": 4, "w1": 6, "w2": 0, "m": 2}
    views = [["prompt", "h", "w1", "m", "w2", "m", "w0"], ["prompt", "h", "w0", "m", "w1"], ["prompt", "w2"]]
    results = {b: shares_of(b, lengths, views, [3, 1, 2], seed=3, device=device) for b in BACKENDS}
    for rows in results.values():
        for row in rows:
            torch.testing.assert_close(row.sum(1), torch.ones(LAYERS), atol=1e-5, rtol=0)
            assert (row >= 0).all()
    for backend in ("torch", "triton"):
        for got, ref in zip(results[backend], results["reference"], strict=True):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for rows in results.values():
        assert (rows[0][:, 4] > 0).all()  # w2 was empty: row 0 sees the 2 tokens fed to it in this same pass


def test_off_costs_nothing(model):
    """Without collab_stats a plan has no statistics and the runner reports none."""
    from hogwild import Runner

    runner = Runner.for_model(model, kv_memory=64 << 20)
    prompt = runner.cache.new_block("prompt")
    runner.prefill([prompt], [1, 2, 3])
    own = runner.cache.new_block("own")
    step = WorkerStep([4], [prompt, own])
    assert runner.plan([step]).stats is None
    assert runner.forward([step]).shares is None
    shares = runner.forward([WorkerStep([5], [prompt, own])], collab_stats=True).shares
    assert [s.shape for s in shares] == [(model.num_layers, 2)]


def test_kinds_and_unseen_blocks():
    """Entries map to kinds; a worker's step the view lacks gets exactly 0; shares add per kind."""
    cache = SharedCache(1, 1, HEAD_DIM, INV_FREQ, capacity_tokens=1024, page_size=4)
    b = {n: cache.new_block(n) for n in ("prompt", "history", "others_header", "marker", "own_header", "A", "B", "C")}
    shared = SharedBlocks(b["prompt"], b["history"], b["others_header"], b["marker"], b["own_header"])
    labels = collab.block_labels(shared, {"Alice": b["A"], "Bob": b["B"], "Carol": b["C"]})
    view = [b["prompt"], b["history"], b["others_header"], b["B"], b["marker"], b["own_header"], b["A"]]
    entries = torch.tensor([[0.4, 0.2, 0.05, 0.1, 0.05, 0.05, 0.15], [0.2, 0.2, 0.1, 0.3, 0.1, 0.0, 0.1]])
    per_layer = collab.view_shares(entries, view, labels, "Alice", ["Bob", "Carol"])
    mean = collab.layer_mean(per_layer)
    assert mean["prompt"] == pytest.approx(0.3) and mean["protocol"] == pytest.approx(0.175)
    assert mean["own"] == pytest.approx(0.125) and mean["others"]["Bob"] == pytest.approx(0.2)
    assert mean["others"]["Carol"] == 0.0 and per_layer["others"]["Carol"] == [0.0, 0.0]
    total = sum(mean[k] for k in collab.KINDS) + sum(mean["others"].values())
    assert total == pytest.approx(1.0, abs=1e-6)


def test_who_reads_whom_payload():
    event = CollabEvent(7, {"Alice": {**collab.empty_shares(["Bob"]), "own": 0.7, "others": {"Bob": 0.3}},
                            "Bob": {**collab.empty_shares(["Alice"]), "prompt": 0.9, "others": {"Alice": 0.1}}}, {})
    payload = collab.server_payload(event, ["Alice", "Bob", "Carol"])
    assert payload["forward_passes"] == 7 and payload["type"] == "collaboration"
    assert payload["matrix"] == [[0.7, 0.3, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert json.loads(json.dumps(payload)) == payload


# -- duplication ----------------------------------------------------------------------------------
TEXT = ("We split the rectangle into two triangles and compute each area from the base and height.\n"
        "The base is four and the height is three so each triangle has area six.")


def test_exact_copy_scores_one_and_disjoint_text_zero():
    copy = collab.duplication([HistoryStep("Alice", 1, TEXT), HistoryStep("Bob", 1, TEXT)], ["Alice", "Bob"], QUESTION)
    assert copy["Bob"]["ngram_overlap"] == 1.0 and copy["Alice"]["ngram_overlap"] == 0.0  # Alice wrote it first
    assert copy["Bob"]["repeated_lines"] == copy["Bob"]["lines"] == 2 and copy["Alice"]["repeated_lines"] == 0
    other = "Meanwhile I will check the perimeter: two times seven gives fourteen, which matches the drawing."
    disjoint = collab.duplication([HistoryStep("Alice", 1, TEXT), HistoryStep("Bob", 1, other)], ["Alice", "Bob"],
                                  QUESTION)
    assert disjoint["Bob"]["ngram_overlap"] == 0.0 and disjoint["Bob"]["repeated_lines"] == 0


def test_own_repeats_half_copies_mentions_and_protocol_words():
    """Repeating oneself is not duplication; half a copied step scores one half of its 8-grams;
    names are counted; the protocol's seeded words and question never count as shared."""
    words = [f"w{i}" for i in range(30)]
    first, second = " ".join(words[:15]), " ".join(words[15:])  # 8 eight-grams each
    history = [
        HistoryStep("Alice", 1, f" Hi, I'm Alice. {first}"),
        HistoryStep("Alice", 2, f"{first}"),  # her own words again
        HistoryStep("Bob", 1, f" Hi, I'm Alice. Bob here: Alice is right. {first} {second}"),
    ]
    d = collab.duplication(history, ["Alice", "Bob"], QUESTION, forced=[" Hi, I'm Alice."])
    assert d["Alice"]["ngram_overlap"] == 0.0
    grams = collab.ngrams(f"Bob here: Alice is right. {first} {second}", 8)
    assert d["Bob"]["ngram_overlap"] == pytest.approx(len(collab.ngrams(first, 8)) / len(grams), abs=1e-6)
    assert d["Bob"]["mentions"] == {"Alice": 1} and d["Alice"]["mentions"] == {"Bob": 0}


def test_redundancy_checks_and_changed_course():
    plan = "I compute the area of the big rectangle by multiplying its two sides together now"
    history = [
        HistoryStep("Alice", 1, plan),
        HistoryStep("Alice", 2, f" {QUESTION.strip()} yes, Bob does this."),
        HistoryStep("Alice", 3, "Instead I will verify the perimeter of the small square carefully."),
        HistoryStep("Alice", 4, plan),
        HistoryStep("Alice", 5, f" {QUESTION.strip()} yes."),
        HistoryStep("Alice", 6, plan + " again"),  # the same work after answering yes: no change
        HistoryStep("Alice", 7, f" {QUESTION.strip()} no, go on."),
        HistoryStep("Alice", 8, f" {QUESTION.strip()} maybe"),
    ]
    d = collab.duplication(history, ["Alice"], QUESTION)["Alice"]
    assert (d["checks"], d["checks_yes"], d["changed_course"]) == (4, 2, 1)
    assert collab.redundancy_check_reply(history[6].text, QUESTION) == "no"
    assert collab.redundancy_check_reply(history[7].text, QUESTION) == "unclear"
    assert collab.redundancy_check_reply(plan, QUESTION) is None


# -- the embedded model -----------------------------------------------------------------------------
def test_solve_reports_shares_every_pass(model):
    """2 workers on SmolLM2: a CollabEvent per pass whose shares sum to 1; independent workers put
    exactly 0 on each other; the run average lands in the Result."""
    engine = Engine(model, ProtocolConfig(finisher_tokens=2))  # a short finisher keeps it fast
    for layout, budget in (("combined", 6), ("independent", 4)):
        events = list(engine.stream("What is 6 * 7?", workers=2, layout=layout, budget=budget, seed=0,
                                    collab_stats=True))
        passes = [e for e in events if isinstance(e, CollabEvent)]
        result = events[-1].result
        assert isinstance(events[-1], DoneEvent)
        assert [e.forward_passes for e in passes] == list(range(1, result.forward_passes + 1))
        for event in passes:
            assert set(event.shares) == {"Alice", "Bob"}
            for name, s in event.shares.items():
                assert sum(s[k] for k in collab.KINDS) + collab.on_others(s) == pytest.approx(1.0, abs=1e-5)
                assert len(event.per_layer[name]["prompt"]) == model.num_layers
                if layout == "independent":
                    assert collab.on_others(s) == 0.0 and s["history"] == s["protocol"] == 0.0
        average = result.collaboration["attention"]
        assert set(average) == {"Alice", "Bob"} and set(result.collaboration["duplication"]) == {"Alice", "Bob"}
        if layout == "combined":  # from the second pass on each worker reads the other's step
            assert all(average[n]["protocol"] > 0 and collab.on_others(average[n]) > 0 for n in average)
        else:
            assert all(collab.on_others(average[n]) == 0.0 for n in average)
