"""The AsyncAPI document of the topics: committed as the code generates it, well formed
(AsyncAPI 3.0's structure, every reference resolves), and true of the real messages."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import jsonschema
import msgspec
import pytest

import bootstrap.asyncapi
import bootstrap.cli
from bootstrap.asyncapi import CONSUMERS, document, message_id
from bootstrap.cli import ASYNCAPI_FILE, SCHEMAS_DIR, schemas
from domain import contracts
from domain.billing import BILLING_CONTRACTS, Account, InvoiceLine, Money
from runtime.publisher import headers_for
from tests.unit.test_contracts import _events_of_every_type

DOC = document()


def resolve(ref: str) -> Any:
    """The object a local `#/a/b` reference names; KeyError if there is none."""
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def rooted(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema of the document, with the document's components for its references."""
    return {**schema, "components": DOC["components"]}


def refs(node: Any) -> list[str]:
    """Every `$ref` anywhere under `node`."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def published_messages() -> list[tuple[contracts.Contract, bytes, list[tuple[str, bytes]]]]:
    """A real message (contract, value, headers) of every published event type."""
    envelopes = []
    for event in _events_of_every_type():
        object.__setattr__(event, "correlation_id", "req-1")
        object.__setattr__(event, "actor_id", "user-1")
        object.__setattr__(event, "actor_role", "receptionist")
        envelopes.append(contracts.envelope_for(event, 7))
    now = datetime(2026, 6, 15, 9, tzinfo=UTC)
    account, opened = Account.open(uuid4(), "GBP", "PatientRegistered", now)
    account, issued = account.issue_invoice(uuid4(), "GBP", [InvoiceLine("visit", 1, 5000)])
    account, paid = account.record_payment(uuid4(), Money(2000, "GBP"))
    closing = account.close(now)
    assert closing is not None
    _, closed = closing
    for version, data in enumerate((opened, issued, paid, closed), start=1):
        envelopes.append(
            contracts.envelope(
                data,
                aggregate_id=account.id,
                aggregate_version=version,
                position=9,
                occurred_at=now,
            )
        )
    out = []
    for envelope in envelopes:
        assert envelope is not None
        contract = contracts.BY_TYPE[(envelope.type, envelope.schema_version)]
        out.append((contract, msgspec.json.encode(envelope), headers_for(envelope)))
    return out


def test_the_committed_document_matches_the_code():
    committed = (SCHEMAS_DIR / ASYNCAPI_FILE).read_text()
    assert committed == json.dumps(DOC, indent=2, sort_keys=True) + "\n", "run `make schemas`"


def test_the_check_notices_a_changed_message_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(bootstrap.cli, "SCHEMAS_DIR", tmp_path)
    assert schemas("write") == 0
    assert schemas("check") == 0
    target = tmp_path / ASYNCAPI_FILE
    written = json.loads(target.read_text())
    headers = written["components"]["messages"]["PatientRegistered.v2"]["headers"]
    headers["properties"]["event-type"]["const"] = "PatientSignedUp"
    target.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    capsys.readouterr()
    assert schemas("check") == 1
    assert capsys.readouterr().err.splitlines() == [
        f"schemas/{ASYNCAPI_FILE} differs from the code: run `make schemas`"
    ]


def test_the_check_notices_a_message_changed_in_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(bootstrap.cli, "SCHEMAS_DIR", tmp_path)
    assert schemas("write") == 0
    described = bootstrap.asyncapi.HEADERS["position"]
    monkeypatch.setitem(bootstrap.asyncapi.HEADERS, "position", ({"type": "integer"}, "changed"))
    capsys.readouterr()
    assert schemas("check") == 1
    assert f"schemas/{ASYNCAPI_FILE} differs" in capsys.readouterr().err
    monkeypatch.setitem(bootstrap.asyncapi.HEADERS, "position", described)
    assert schemas("check") == 0


def test_the_document_has_asyncapi_3_structure():
    assert DOC["asyncapi"] == "3.0.0"
    assert DOC["info"]["title"] and DOC["info"]["version"]
    (server,) = DOC["servers"].values()
    assert server["protocol"] == "kafka" and ":" in server["host"]
    (scheme,) = [resolve(s["$ref"]) for s in server["security"]]
    assert scheme["type"] == "scramSha512"
    for channel_id, channel in DOC["channels"].items():
        assert channel["address"] == channel["bindings"]["kafka"]["topic"]
        assert channel["messages"], channel_id
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/")
    assert DOC["operations"]
    for operation_id, operation in DOC["operations"].items():
        assert operation["action"] in ("send", "receive"), operation_id
        channel_ref = operation["channel"]["$ref"]
        channel = resolve(channel_ref)
        assert operation["messages"], operation_id
        for message in operation["messages"]:
            # AsyncAPI 3.0: an operation's messages are its channel's.
            assert message["$ref"].startswith(channel_ref + "/messages/"), operation_id
            assert resolve(message["$ref"]) in channel["messages"].values()
    for message_name, message in DOC["components"]["messages"].items():
        assert "payload" in message and message["headers"]["type"] == "object", message_name


def test_every_reference_resolves():
    found = refs(DOC)
    assert len(found) > 100
    for ref in found:
        resolve(ref)  # raises KeyError if it names nothing


def test_each_topic_lists_every_type_and_version_and_who_sends_and_reads_it():
    every = [*contracts.CONTRACTS.values(), *contracts.SUPERSEDED, *BILLING_CONTRACTS.values()]
    for contract in every:
        channel = DOC["channels"][contract.stream]
        assert channel["address"] == contract.stream
        assert message_id(contract) in channel["messages"]
    sent = {
        op["channel"]["$ref"]: op
        for op in DOC["operations"].values()
        if op["action"] == "send" and "groupId" not in op.get("bindings", {}).get("kafka", {})
    }
    relayed = [m["$ref"] for m in sent["#/channels/patient.events"]["messages"]]
    assert "#/channels/patient.events/messages/PatientRegistered.v3" in relayed
    for superseded in ("PatientRegistered.v1", "PatientRegistered.v2"):
        assert f"#/channels/patient.events/messages/{superseded}" not in relayed, "superseded"
    assert "#/channels/billing.events" in sent and "#/channels/appointment.events" in sent
    groups = {
        (op["channel"]["$ref"], op["bindings"]["kafka"]["groupId"]["const"])
        for op in DOC["operations"].values()
        if op["action"] == "receive"
    }
    assert ("#/channels/patient.events", "carelog-directory") in groups
    assert ("#/channels/patient.events", "carelog-billing") in groups
    assert ("#/channels/billing.events", "carelog-analytics") in groups
    assert ("#/channels/appointment.events", "carelog-appointments") in groups
    for consumer in CONSUMERS:
        assert DOC["channels"][consumer.dead_letter_topic]["messages"] == {
            "DeadLetter": {"$ref": "#/components/messages/DeadLetter"}
        }
    assert "patient.events.dlq.carelog-directory" in DOC["channels"]


def test_real_messages_match_their_documented_payload_key_and_headers():
    checked = set()
    for contract, value, headers in published_messages():
        message = resolve(f"#/components/messages/{message_id(contract)}")
        assert message["contentType"] == "application/json"
        key = message["bindings"]["kafka"]["key"]
        assert (key["type"], key["format"]) == ("string", "uuid")  # str(aggregate id)
        jsonschema.validate(json.loads(value), rooted(message["payload"]))
        jsonschema.validate({k: v.decode() for k, v in headers}, rooted(message["headers"]))
        checked.add(message_id(contract))
    every = [*contracts.CONTRACTS.values(), *BILLING_CONTRACTS.values()]
    assert checked == {message_id(c) for c in every}


def test_a_message_of_another_type_does_not_match():
    (contract, value, headers), *_ = published_messages()
    other = resolve("#/components/messages/InvoiceIssued.v1")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(value), rooted(other["payload"]))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v.decode() for k, v in headers}, rooted(other["headers"]))
    unnamed = {k: v.decode() for k, v in headers if k != "event-id"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            unnamed, rooted(resolve(f"#/components/messages/{message_id(contract)}")["headers"])
        )
