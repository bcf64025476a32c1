"""The spot simulator over small traces whose outcome is worked out by hand in each test.

The job: 20 steps, 1-2 workers, a checkpoint every 5 steps costing 1 s; a step takes 2 s on one
worker and 1 s on two. Recovery: start 10 s, join 5 s, notice 4 s, hard loss 8 s, plain
restart 20 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elastic_ft.sim.calibration import Calibration, calibrate, step_s_from_metrics
from elastic_ft.sim.policies import Job, simulate
from elastic_ft.sim.traces import NodeEvent, Trace, from_counts, load_trace

ROOT = Path(__file__).resolve().parents[2]
CAL = Calibration({1: 2.0, 2: 1.0}, {"start": 10, "join": 5, "notice": 4, "hard_loss": 8,
                                     "restart": 20}, 1.0)
JOB = Job(steps=20, min_workers=1, max_workers=2, checkpoint_every_steps=5)


def _trace(*rows: tuple[float, str, str]) -> Trace:
    return Trace("hand", tuple(NodeEvent(*r) for r in rows), rows[-1][0], open_ended=True)


NOTICED = _trace((0, "add", "a"), (0, "add", "b"), (20, "notice", "b"), (30, "remove", "b"),
                 (40, "add", "c"))
HARD = _trace((0, "add", "a"), (0, "add", "b"), (20, "remove", "b"), (40, "add", "c"))


def test_elastic_ft_on_a_notice_then_a_join_loses_nothing() -> None:
    # start at 10; steps 1-9 at 2 workers by t=20 (checkpoint after 5); the notice: a
    # checkpoint at step 9, 4 s, then 1 worker from 24 (step 10 at 26, checkpoint, 11 at 29,
    # ... 16 at 40); c joins: checkpoint at 16, 5 s, steps 17-20 at 2 workers by 49
    r = simulate("elastic_ft", NOTICED, JOB, CAL, 3600.0)
    assert (r.finished, r.completion_s, r.lost_steps, r.restarts) == (True, 49.0, 0, 2)
    # paid: a 0-49, b 0-30 (paid until it goes, notice or not), c 40-49
    assert r.paid_node_h * 3600 == pytest.approx(49 + 30 + 9)
    assert r.productive_node_h * 3600 == pytest.approx(9 * 2 + 7 * 2 + 4 * 2)
    assert r.cost == pytest.approx(88.0)  # $3600/h: one dollar a node-second
    assert r.goodput == pytest.approx(40 / 88)


def test_elastic_ft_on_a_hard_loss_goes_back_to_the_checkpoint_and_goes_on_at_one() -> None:
    # steps 6-9 lost at t=20; 1 worker from 28 (steps 6-10 by 38, checkpoint, half of 11);
    # c joins at 40: checkpoint at 10, 5 s; steps 11-20 at 2 workers with one checkpoint: 56
    r = simulate("elastic_ft", HARD, JOB, CAL, None)
    assert (r.completion_s, r.lost_steps, r.restarts, r.cost) == (56.0, 4, 2, None)
    assert r.lost_node_h * 3600 == pytest.approx(8)


def test_restart_waits_paid_and_wait_waits_unpaid() -> None:
    # the fixed size 2: steps 6-9 lost at 20, a waits for c (40), restart 20 s: steps 6-20
    # with checkpoints after 10 and 15 from t=60: 77
    restart = simulate("restart", HARD, JOB, CAL, 3600.0)
    wait = simulate("wait", HARD, JOB, CAL, 3600.0)
    for r in (restart, wait):
        assert (r.completion_s, r.lost_steps, r.restarts) == (77.0, 4, 1)
    assert restart.cost == pytest.approx(77 + 20 + 37)  # a paid while it waits
    assert wait.cost == pytest.approx(20 + 37 + 20 + 37)  # released at 20, back at 40
    # a notice changes nothing for them: b goes at 30 with steps 16-17 past the checkpoint
    assert simulate("restart", NOTICED, JOB, CAL, None).lost_steps == 2


def test_on_demand_is_never_interrupted() -> None:
    r = simulate("on_demand", HARD, JOB, CAL, 1.0)
    assert (r.completion_s, r.lost_steps, r.restarts) == (33.0, 0, 0)  # 10 + 20 + 3 checkpoints
    assert r.paid_node_h == pytest.approx(2 * 33 / 3600)


def test_a_trace_that_ends_first_leaves_the_job_unfinished() -> None:
    short = Trace("short", (NodeEvent(0, "add", "a"),), 30.0)
    r = simulate("elastic_ft", short, JOB, CAL, None)
    assert not r.finished and r.completion_s is None and 0 < r.steps_done < 20


def test_counts_become_node_events_with_a_notice_before_each_removal() -> None:
    trace = from_counts([0, 2, 2, 1, 3, 9], 100.0, "t", notice_s=30, cap=3)
    assert trace.available() == [(0, 0), (100, 1), (100, 2), (300, 1), (400, 2), (400, 3)]
    removed = [e for e in trace.events if e.kind == "remove"]
    notices = {e.node: e.t_s for e in trace.events if e.kind == "notice"}
    assert [(e.t_s, notices[e.node]) for e in removed] == [(300, 270)]
    assert trace.end_s == 600


def test_trace_files_and_their_errors(tmp_path) -> None:
    shipped = load_trace(ROOT / "benchmarks" / "spot-traces" /
                         "availability-16node-v100-aws-2023-08" / "us-west-2a.json")
    assert shipped.end_s == 300 * len(json.loads((ROOT / "benchmarks" / "spot-traces" /
                                                  "availability-16node-v100-aws-2023-08" /
                                                  "us-west-2a.json").read_text())["data"])
    assert max(n for _, n in shipped.available()) == 16
    rows = tmp_path / "events.csv"
    rows.write_text("t,kind,node\n0,add,a\n5,remove,a\n")
    assert [e.kind for e in load_trace(rows).events] == ["add", "remove"]
    rows.write_text("t,kind,node\n0,leave,a\n")
    with pytest.raises(ValueError, match="row 1: needs t, kind"):
        load_trace(rows)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_trace(tmp_path / "missing.json")


def test_calibration_names_its_sources_and_what_is_missing(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0, "step_s": 9.0 if s == 1 else 0.5, "world_size": 2,
             "t": float(s)} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    events = [{"event": "checkpoint", "t": 1.0, "mode": "async", "seconds": 0.25}] + [
        {"event": "recovery", "t": 9.0, "trigger": kind, "total_s": s}
        for kind, s in (("drain", 30.0), ("preempting", 20.0), ("join", 11.0))]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    assert step_s_from_metrics(run) == {2: 0.5}  # a group's first step left out
    recovery = ROOT / "benchmarks" / "results" / "cpu-2core" / "elastic_recovery.json"
    cal = calibrate(run_dir=run, recovery=recovery)
    assert cal.checkpoint_s == 0.25 and cal.step_time(4) == pytest.approx(0.25)
    assert "scaled linearly from 2" in cal.source_of_step(4)
    assert "metrics.jsonl" in cal.sources["step_s"] and "elastic_recovery" in \
        cal.sources["recovery_s"]
    # the run's own recovery events fill in what the benchmark file does not give
    partial = calibrate(run_dir=run, overrides={"start": 5, "hard_loss": 9, "restart": 60})
    assert partial.recovery_s["notice"] == 25.0 and partial.recovery_s["join"] == 11.0
    assert "events.jsonl" in partial.sources["recovery_s.notice"]
    with pytest.raises(ValueError, match="no step time"):
        calibrate(recovery=recovery, checkpoint_s=1)
    with pytest.raises(ValueError, match=r"no recovery time for \['start', 'hard_loss'"):
        calibrate(run_dir=run)


def test_the_old_group_trains_on_while_a_notice_s_restart_is_prepared() -> None:
    # 2 s of the 4 s notice recovery at 2 workers: step 10 by 21 and its checkpoint by 22;
    # 1 worker from 24 (steps 11-17, a checkpoint after 15, half of 18 by 40); c joins:
    # checkpoint at 17, 5 s; steps 18-20 at 2 workers by 48
    cal = Calibration(CAL.step_s, CAL.recovery_s, 1.0, train_during_s={"notice": 2.0})
    r = simulate("elastic_ft", NOTICED, JOB, cal, None)
    assert (r.completion_s, r.lost_steps, r.restarts) == (48.0, 0, 2)
