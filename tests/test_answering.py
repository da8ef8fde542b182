"""Answer while thinking: exactness, probes that leave no trace, scripted probe policies, per-role
banned tokens, bounded runs that free every block."""

import dataclasses

import pytest
import torch
from test_visibility import tiny_llama

from hogwild import (
    AnswerEvent,
    AnsweringConfig,
    BatchLoop,
    DoneEvent,
    Engine,
    FirstAnswerTokenEvent,
    ModeEvent,
    ProbeEvent,
    TokenEvent,
    ordinary_attention,
)
from hogwild.protocol.answering import AnsweringProtocol

PROBLEM = "What is 12 * 7?"


def yes(index: int, p_yes: float, p_no: float) -> bool:
    """A scripted probe policy: the writer may always go on."""
    return True


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, attention="torch", kv_memory=256 << 20)


def drive(engine, config, policy=None, protocol=None, close=True):
    """Run one session step by step; check that no pass has zero rows. Returns (session, events);
    close=False leaves the session's blocks in the cache (the caller closes it)."""
    engine_protocol = engine.answering
    if protocol is not None:
        engine.answering = protocol
    session = engine.answering_session(PROBLEM, config, policy)
    engine.answering = engine_protocol
    loop = BatchLoop(engine.runner)
    events = loop.add(session)
    try:
        while not session.done:
            assert session.inputs(), "a pass with zero rows"
            step = loop.step().sessions[session]
            assert step.error is None, step.error
            events += step.events
        events.append(DoneEvent(session.result()))
    finally:
        if close or not session.done:
            loop.remove(session)
    return session, events


@torch.no_grad()
def greedy_after(model, ids: list[int], n: int, banned: set[int]) -> list[int]:
    """Ordinary greedy decoding of n tokens after ids (full forwards), with banned tokens masked."""
    out = []
    with ordinary_attention(model.model, "sdpa"):
        for _ in range(n):
            logits = model.model(torch.tensor([ids + out])).logits[0, -1].float()
            logits[sorted(banned)] = float("-inf")
            out.append(int(logits.argmax()))
    return out


def test_with_the_writer_waiting_the_thinker_decodes_its_view_exactly(engine, model):
    """Always no: the writer never starts, so the thinker's view is one plain sequence (prompt,
    empty draft, split, own tokens); its greedy tokens equal ordinary decoding of it, probes and all."""
    session, events = drive(engine, AnsweringConfig(budget=20), lambda i, y, n: False, close=False)
    assert any(isinstance(e, ProbeEvent) for e in events)  # probes ran between the passes
    thinker = session.thinkers[0]
    view = session.tp.token_ids + session.ts.token_ids + thinker.block.token_ids[:1]
    session.close()
    banned = set(session.samplers["thinker"].params.banned_token_ids)
    assert thinker.generated == greedy_after(model, view, len(thinker.generated), banned)
    assert session.writer.generated == [] and engine.runner.cache.nbytes() == 0


def test_a_probe_leaves_no_trace(engine, monkeypatch):
    """The thinker's logits are the same, pass for pass, with real probes between the passes and with none."""
    def logits_of_run(probe: bool):
        session = engine.answering_session(PROBLEM, AnsweringConfig(budget=24), lambda i, y, n: False)
        if not probe:
            monkeypatch.setattr(session, "_probe", lambda: (0.0, 1.0))
        seen, blocks = [], []
        session.start()
        try:
            while not session.done:
                logits = engine.runner.forward(session.inputs()).logits
                seen.append(logits[0].clone())
                session.advance(logits)
                blocks.append(len(engine.runner.cache.blocks))
        finally:
            session.close()
        return seen, blocks, session.probe_passes

    with_probes, blocks, probes = logits_of_run(True)
    without, _, none = logits_of_run(False)
    assert probes >= 2 and none == 0
    assert len(set(blocks)) == 1  # every probe's block was freed
    for a, b in zip(with_probes, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def first(events, kind, **match):
    return next(i for i, e in enumerate(events) if isinstance(e, kind)
                and all(getattr(e, k) == v for k, v in match.items()))


def test_always_yes_answers_while_the_thinker_still_thinks(engine):
    session, events = drive(engine, AnsweringConfig(budget=30), yes)
    writer_first = first(events, TokenEvent, role="writer")
    thinker_last = max(i for i, e in enumerate(events) if isinstance(e, TokenEvent) and e.role == "thinker")
    assert writer_first < thinker_last
    assert first(events, FirstAnswerTokenEvent) == writer_first + 1
    result = events[-1].result
    assert result.answering["first_answer_passes"] <= 20 and result.answering["text"]
    assert result.forward_passes <= 30 and engine.runner.cache.nbytes() == 0
    assert result.answering["probe_passes"] <= 30 // AnsweringProtocol().probe_every + result.answering["pauses"] + 1


def test_always_no_leaves_the_answer_to_the_finisher(engine):
    session, events = drive(engine, AnsweringConfig(budget=24), lambda i, y, n: False)
    result = events[-1].result
    assert not any(isinstance(e, TokenEvent) and e.role == "writer" for e in events)
    assert result.answered_by == "finisher" and result.forward_passes == 24
    assert result.answering["first_answer_passes"] is None and result.answering["text"] == ""
    assert result.answering["probe_passes"] >= 1


def test_alternating_probes_pause_and_resume_the_writer(engine):
    session, events = drive(engine, AnsweringConfig(budget=36), lambda i, y, n: i % 2 == 0)
    modes = [e.mode for e in events if isinstance(e, ModeEvent)]
    probes = [e.ready for e in events if isinstance(e, ProbeEvent)]
    assert probes[:2] == [True, False] and modes[0] == "think" and "both" in modes
    assert events[-1].result.forward_passes <= 36 and engine.runner.cache.nbytes() == 0


def test_an_early_end_of_thinking_lets_the_writer_finish_alone(engine):
    """The end marker is the protocol's (here a full stop, so the thinker ends within its first sentence)."""
    protocol = dataclasses.replace(AnsweringProtocol(), end_of_thinking=".")
    session, events = drive(engine, AnsweringConfig(budget=24), lambda i, y, n: False, protocol)
    write = first(events, ModeEvent, mode="write")
    assert not any(isinstance(e, TokenEvent) and e.role == "thinker" for e in events[write:])
    assert any(isinstance(e, TokenEvent) and e.role == "writer" for e in events[write:])
    assert events[-1].result.forward_passes <= 24


def test_a_writer_that_never_ends_stops_at_the_budget(engine):
    session, events = drive(engine, AnsweringConfig(thinkers=0, budget=16), None)
    result = events[-1].result
    assert result.forward_passes == 16 and result.answering["first_answer_passes"] == 1
    assert len(session.writer.generated) == 16 and engine.runner.cache.nbytes() == 0


def test_banned_tokens_hold_per_role(engine):
    """Logits that put all the mass on a forbidden token: the thinker never ends the turn, the writer
    never writes a turn opener; the writer's end of turn ends the answer."""
    session = engine.answering_session(PROBLEM, AnsweringConfig(budget=8), yes)
    session.start()
    try:
        vocab = engine.runner.model.model.get_output_embeddings().out_features
        opener = engine.model.tokenizer.convert_tokens_to_ids("<|im_start|>")
        end = min(session.ends)
        logits = torch.zeros(1, vocab)
        logits[0, end] = 100.0
        session.advance(logits)  # the thinker alone
        assert session.thinkers[0].generated[-1] not in session.ends
        session.mode = "both"
        logits = torch.zeros(2, vocab)
        logits[:, 1000] = 50.0  # an ordinary token: the best one allowed
        logits[:, opener] = 100.0
        session.advance(logits)
        assert session.writer.generated[-1] != opener and session.thinkers[0].generated[-1] != opener
        logits = torch.zeros(2, vocab)
        logits[:, 1000] = 50.0
        logits[1, end] = 100.0
        events = session.advance(logits)
        assert session.done and not session.writer.active
        assert [e.answered_by for e in events if isinstance(e, AnswerEvent)] in (["Writer"], ["finisher"])
    finally:
        session.close()


@pytest.mark.parametrize("attention", ["reference", "triton"])
def test_every_backend_agrees_with_torch_on_the_answering_views(attention, tmp_path):
    """Two thinkers and a writer reading each other's blocks (always yes): the same greedy tokens."""
    loaded = tiny_llama(tmp_path, layers=2)
    tokens = {}
    for backend in ("torch", attention):
        runs = Engine(loaded, attention=backend, kv_memory=16 << 20)
        short = dataclasses.replace(AnsweringProtocol(), thinker_system="Think.", thinkers_system="Think {end}.",
                                    writer_system="Answer.", probe_every=2, finisher_tokens=2)
        session, events = drive(runs, AnsweringConfig(thinkers=2, budget=8), yes, short)  # (512 positions)
        tokens[backend] = [(e.worker, e.token_id) for e in events if isinstance(e, TokenEvent)]
    assert any(w == "Writer" for w, _ in tokens["torch"]) and tokens[attention] == tokens["torch"]


def test_bad_config_is_refused():
    from hogwild import InputError

    for bad in (AnsweringConfig(thinkers=9), AnsweringConfig(budget=0), AnsweringConfig(collab_stats=True)):
        with pytest.raises(InputError):
            bad.check()
