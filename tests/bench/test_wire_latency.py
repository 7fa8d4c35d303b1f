"""bench.wire_latency: round trips over the service's channel and over ZeroMQ, between two processes."""

from __future__ import annotations

from bench.wire_latency import main, wire_round_trips, zmq_round_trips


def test_each_transport_times_every_round_trip():
    for measure in (wire_round_trips, zmq_round_trips):
        rtt = measure(20)
        assert len(rtt) == 20 and all(0 < us < 10_000_000 for us in rtt)


def test_the_command_prints_both_transports(capsys):
    assert main(["--messages", "5"]) == 0
    out = capsys.readouterr().out
    assert "service channel" in out and "ZeroMQ" in out and "p99" in out
