"""Identity self-checks against the test DNS, enforced: no mail leaves until DNS is right."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.world import BLOCKLIST, PODS, SENDER_DOMAIN, World, base_records, ptr_name

EGRESS = PODS["mta-0"]["egress"]


def broken(world: World, case: str) -> list[str]:
    records = base_records(world.dkim_record)
    if case == "ptr-mismatch":
        records = [r for r in records if not r.startswith(ptr_name(EGRESS))]
        records.append(f"{ptr_name(EGRESS)} IN PTR mail.elsewhere.test.")
    elif case == "spf-without-ip":
        records = [r for r in records if not r.startswith(f"{SENDER_DOMAIN}. IN TXT")]
        records.append(f'{SENDER_DOMAIN}. IN TXT "v=spf1 ip4:{PODS["mta-1"]["egress"]} -all"')
    elif case == "listed":
        records.append(f"{'.'.join(reversed(EGRESS.split('.')))}.{BLOCKLIST}. IN A 127.0.0.2")
    return records


@pytest.mark.parametrize(("case", "check"), [
    ("ptr-mismatch", "fcrdns"),
    ("spf-without-ip", f"spf:{SENDER_DOMAIN}"),
    ("listed", f"dnsbl:{BLOCKLIST}"),
])
def test_enforced_identity_holds_mail_until_dns_is_fixed(world: World, case: str, check: str) -> None:
    pod = world.pods["mta-0"]
    assert world.postfix is not None
    world.publish(broken(world, case))
    deadline = time.monotonic() + 20
    status, body = pod.readyz()
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        status, body = pod.readyz()
    assert status == 503, f"{pod.name} stayed ready with {case}: {body}"
    identity = body["checks"]["identity"]
    assert not identity["ok"] and check in identity["detail"], body
    assert world.pods["mta-1"].readyz()[0] == 200, "the other pod's identity is still right"

    rcpt = f"held-{uuid.uuid4().hex[:8]}@dest.test"
    qid = world.submit([rcpt])
    time.sleep(4)  # several check intervals and retry periods
    assert world.postfix.mailbox(rcpt) == [], f"mail left {pod.name} while its {check} check failed"
    [item] = [i for i in pod.queue_list() if i["id"] == qid]
    assert item["attempts"] == 0, item

    world.restore_dns()
    world.postfix.wait_for_mail(rcpt, timeout=30)
    pod.wait_ready(timeout=15)
