"""A restart's timeline put together from hand-made marks (resources/recovery.py)."""

from __future__ import annotations

from elastic_ft.resources.recovery import last_rank_marks, recovery_timeline, trigger_of


def test_phases_run_from_the_change_to_the_first_step_in_time_order() -> None:
    marks = [("model_loaded", 112.0), ("old_group_stopped", 104.5), ("imported", 109.0),
             ("checkpoint_in_storage", 101.0), ("before_the_change", 90.0),
             ("checkpoint_loaded", 113.5)]
    timeline = recovery_timeline({"kind": "drain", "t": 100.0}, marks, 115.0)
    assert timeline["trigger"] == "drain" and timeline["total_s"] == 15.0
    assert [(p["phase"], p["s"]) for p in timeline["phases"]] == [
        ("checkpoint_in_storage", 1.0), ("old_group_stopped", 3.5), ("imported", 4.5),
        ("model_loaded", 3.0), ("checkpoint_loaded", 1.5), ("first_step", 1.5)]
    assert sum(p["s"] for p in timeline["phases"]) == timeline["total_s"]


def test_the_trigger_is_the_first_change_since_the_last_group_started() -> None:
    events = [{"event": "node_lost", "t": 5.0, "node_id": "old"},
              {"event": "checkpoint", "t": 12.0},
              {"event": "node_draining", "t": 20.0, "node_id": "b"},
              {"event": "node_lost", "t": 31.0, "node_id": "b"}]
    assert trigger_of(events, 10.0, []) == {"kind": "drain", "t": 20.0}
    # a failure Ray Train saw before our watcher saw the node go
    clock = [("ray_train:restarting", 29.0), ("old_group_stopped", 30.0)]
    assert trigger_of(events, 25.0, clock) == {"kind": "restarting", "t": 29.0}
    assert trigger_of(events, 10.0, clock) == {"kind": "drain", "t": 20.0}
    # Ray Train grows a live group only for a join: its decision can come before our node_join
    grow = [("ray_train:resizing", 50.0)]
    assert trigger_of(events + [{"event": "node_join", "t": 52.0}], 45.0, grow) == {
        "kind": "join", "t": 50.0}
    # our watcher saw the node alive before Ray Train's decision and the monitor's node_join
    alive = [("node_alive", 48.5)] + grow
    assert trigger_of(events + [{"event": "node_join", "t": 52.0}], 45.0, alive) == {
        "kind": "join", "t": 48.5}
    assert trigger_of([], 50.0, []) == {"kind": "restart", "t": 50.0}


def test_the_newest_rank_process_and_its_warm_up_are_marked() -> None:
    places = [{"process_started_t": 10.0, "warm_times": [11.0, 14.0]},  # an old spare
              {"process_started_t": 49.0, "warm_times": [50.2, 55.5]},  # the joined node's
              {"process_started_t": None}]
    assert last_rank_marks(places) == [("last_rank_process_started", 49.0),
                                       ("last_rank_warm_started", 50.2),
                                       ("last_rank_warmed", 55.5)]
    cold = [{"process_started_t": 49.0, "warm_times": [None, None]}]
    assert last_rank_marks(cold) == [("last_rank_process_started", 49.0)]
    assert last_rank_marks([{}]) == []
    # only marks after the change are phases of its timeline
    timeline = recovery_timeline({"kind": "join", "t": 48.5},
                                 last_rank_marks(places[:1]) + last_rank_marks(places[1:2]), 58.0)
    assert [p["phase"] for p in timeline["phases"]] == [
        "last_rank_process_started", "last_rank_warm_started", "last_rank_warmed", "first_step"]
