"""Scale-down: the StatefulSet goes from two pods to one, and mta-1 hands its queue to mta-0.

mta-1 holds mail it could not deliver yet (mx-flaky answers 4xx), partly
delivered in one case.  The (fake) Kubernetes API then says replicas=1 and
mta-1 gets SIGTERM, as the StatefulSet controller would do: it hands every
queued message over the pod network to mta-0's handoff endpoint and exits
with an empty spool.  Once mx-flaky recovers, mta-0 delivers each message
from its own egress address, and every recipient gets it exactly once.
"""

from __future__ import annotations

import time
import uuid

from tests.e2e.world import KUBE_NAMESPACE, PODS, STATEFULSET, World


def test_scale_down_drains_mta_1_to_mta_0_exactly_once(world: World) -> None:
    mta0, mta1 = world.pods["mta-0"], world.pods["mta-1"]
    assert world.kube is not None and world.postfix is not None
    tag = uuid.uuid4().hex[:6]
    flaky = [f"drain-{i}-{tag}@flaky.test" for i in range(3)]
    done_rcpt = f"drain-done-{tag}@dest.test"
    sink = world.restart_sink("mx-flaky", ["-r", "RCPT"])
    try:
        ids = [world.submit([flaky[0], done_rcpt], pod="mta-1", subject="drain mixed"),
               world.submit([flaky[1]], pod="mta-1", subject="drain 1"),
               world.submit([flaky[2]], pod="mta-1", subject="drain 2")]
        mta1.wait_queue(lambda q: {i["id"] for i in q if i["attempts"] >= 1} >= set(ids), what="first attempts")
        world.postfix.wait_for_mail(done_rcpt)

        world.kube.scale(KUBE_NAMESPACE, STATEFULSET, 1)
        assert mta1.stop(timeout=60) == 0, mta1.log_tail()
        [finished] = mta1.events("drain_finished")
        assert int(finished["moved"]) >= 3, finished
        assert not [i for i in mta1.queue_list() if i["id"] in ids], "mail left behind on mta-1"
        held = {i["id"]: i for i in mta0.queue_list()}
        assert set(ids) <= set(held), f"not handed to mta-0: {set(ids) - set(held)}"
        states = {r["address"]: r["state"] for r in held[ids[0]]["recipients"]}
        assert states == {flaky[0]: "pending", done_rcpt: "delivered"}, states
    finally:
        sink = world.restart_sink("mx-flaky", [])
        world.kube.scale(KUBE_NAMESPACE, STATEFULSET, 2)

    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        got = [r for m in sink.messages() for r in m.recipients if r in flaky]
        if sorted(got) == sorted(flaky):
            break
        time.sleep(0.2)
    time.sleep(5)  # longer than a retry period: a duplicate would have come by now
    mine = [m for m in sink.messages() if set(m.recipients) & set(flaky)]
    assert sorted(r for m in mine for r in m.recipients) == sorted(flaky), [m.recipients for m in mine]
    assert {m.client_addr for m in mine} == {PODS["mta-0"]["egress"]}, "delivered from mta-0's egress address"
    assert len(world.postfix.mailbox(done_rcpt)) == 1, "the recipient delivered before the drain got it again"
    mta0.wait_queue(lambda q: not {i["id"] for i in q} & set(ids), what="drained mail delivered and removed")
