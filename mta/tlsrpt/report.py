"""One domain's day as an RFC 8460 aggregate report: the JSON (§4), gzipped, and its mail (§5.3).

``build`` groups the recorded sessions by policy: a ``summary`` of the
successful and failed sessions and a ``failure-details`` entry per result
type, sending IP and receiving MX.  ``compress`` gzips the JSON
(``application/tlsrpt+gzip``); ``message`` wraps it in a
``multipart/report; report-type="tlsrpt"`` mail with the subject and the
``TLS-Report-Domain`` / ``TLS-Report-Submitter`` headers §5.3 asks for.

Failure: none; these are pure functions of the rows given.
"""

from __future__ import annotations

import calendar
import email.utils
import gzip
import json
import time
import uuid
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from mta.tlsrpt.record import ReportPolicy, SessionRow

MEDIA_TYPE = "application/tlsrpt+gzip"


def new_report_id(day: str, domain: str, submitter: str) -> str:
    return f"{day}T00:00:00Z_{domain}_{uuid.uuid4().hex}@{submitter}"


def build(day: str, domain: str, rows: Sequence[SessionRow], *, organization: str, contact: str,
          report_id: str) -> dict[str, Any]:
    policies: dict[ReportPolicy, dict[str, Any]] = {}
    for row in rows:
        entry = policies.get(row.policy)
        if entry is None:
            policy: dict[str, Any] = {"policy-type": row.policy.type, "policy-domain": domain}
            if row.policy.strings:
                policy["policy-string"] = list(row.policy.strings)
            if row.policy.mx_patterns:
                policy["mx-host"] = list(row.policy.mx_patterns)
            entry = policies[row.policy] = {
                "policy": policy,
                "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
                "failure-details": []}
        if row.result == "ok":
            entry["summary"]["total-successful-session-count"] += row.count
            continue
        entry["summary"]["total-failure-session-count"] += row.count
        detail: dict[str, Any] = {"result-type": row.result}
        if row.sending_ip:
            detail["sending-mta-ip"] = row.sending_ip
        detail["receiving-mx-hostname"] = row.mx_host
        if row.mx_ip:
            detail["receiving-ip"] = row.mx_ip
        detail["failed-session-count"] = row.count
        entry["failure-details"].append(detail)
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": list(policies.values()),
    }


def compress(report: dict[str, Any]) -> bytes:
    # mtime=0: the same report compresses to the same octets (a retry posts what the first try did).
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)


def filename(submitter: str, domain: str, day: str, report_id: str) -> str:
    """§5.3: ``sender!policy-domain!begin-timestamp!end-timestamp!unique-id.json.gz``."""
    begin = calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    unique = report_id.rsplit("_", 1)[-1].partition("@")[0][:16]
    return f"{submitter}!{domain}!{begin}!{begin + 86399}!{unique}.json.gz"


def message(report: dict[str, Any], payload: bytes, *, domain: str, submitter: str, sender: str,
            recipient: str, day: str) -> bytes:
    report_id = report["report-id"]
    # Unfolded: a folded Subject unfolds with two spaces before Report-ID, which §5.3 parsers may not expect.
    mail = EmailMessage(policy=SMTP.clone(max_line_length=998))
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    mail["Date"] = email.utils.formatdate(usegmt=True)
    mail["Message-ID"] = email.utils.make_msgid(domain=submitter)
    mail["TLS-Report-Domain"] = domain
    mail["TLS-Report-Submitter"] = submitter
    mail.set_content(f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}, "
                     f"{day} (UTC).\n")
    mail.add_attachment(payload, maintype="application", subtype="tlsrpt+gzip",
                        filename=filename(submitter, domain, day, report_id))
    # add_attachment made it multipart/mixed; §5.3 names multipart/report with report-type tlsrpt.
    mail.replace_header("Content-Type", mail.get_content_type().replace("mixed", "report"))
    mail.set_param("report-type", "tlsrpt")
    return mail.as_bytes()
