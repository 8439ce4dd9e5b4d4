"""The benchmark harness: providers are checked before they are timed, and interleaved timing fills every result."""

import torch

from frontiers_fast.bench import harness


def _family():
    return harness.Family("demo", [], "cpu", quick=True, min_time=0.01)


def test_time_interleaved_calls_every_provider_in_turn():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    got = harness.time_interleaved(fns, "cpu", min_time=0.0, max_reps=50, warmup=1)
    assert len(got) == 3
    for med, p20, p80 in got:
        assert 0 <= p20 <= med <= p80
    # One warm-up each, then (no time asked for) the minimum of 3 rounds,
    # each starting one provider further along.
    assert calls[:3] == [0, 1, 2]
    assert calls[3:] == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_interleaved_case_checks_then_times():
    x = torch.randn(64, 64, dtype=torch.float64)
    want = x @ x
    bench = _family()
    with bench.case("mm", "fwd", want, 1e-6) as case:
        good = case.run("good", lambda: x @ x)
        bad = case.run("bad", lambda: x @ x + 1)
        boom = case.run("boom", lambda: (_ for _ in ()).throw(RuntimeError("no kernel")))
        stick = case.run("yardstick", lambda: x + x, compare=False)
        # Checked at once, timed when the block ends.
        assert good.max_err is not None and good.ms is None
        assert bad.status.startswith("mismatch")
        assert boom.status.startswith("error: RuntimeError")
    assert good.status == "ok" and good.ms is not None and good.ms > 0
    assert stick.status == "ok" and stick.ms is not None and stick.max_err is None
    assert bad.ms is None and boom.ms is None
    assert [r.provider for r in bench.results] == ["good", "bad", "boom", "yardstick"]


def test_interleaved_provider_failing_while_timed_keeps_the_others():
    x = torch.randn(8, 8, dtype=torch.float64)
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] > 1:  # passes its check, then fails
            raise ValueError("flaky")
        return x

    bench = _family()
    with bench.case("id", "fwd", x, 0.0) as case:
        ok = case.run("ok", lambda: x.clone())
        bad = case.run("flaky", flaky)
    assert ok.status == "ok" and ok.ms is not None
    assert bad.status.startswith("error: ValueError") and bad.ms is None
