"""The contract: the generated gRPC code is what `make proto` makes from proto/ today, and
CreateBillingAccount keeps the seed's wire shape."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from billing_grpc.generated.carelog.billing import v1 as pb
from tests.support.stack import ROOT

GENERATED = ROOT / "billing-grpc" / "billing_grpc" / "generated"
NOT_GENERATED = {"ruff.toml"}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.name not in NOT_GENERATED
        and ".ruff_cache" not in path.parts
    }


def _regenerate(out: Path) -> dict[str, bytes]:
    if shutil.which("make") is None:
        pytest.fail("make is needed to run the `proto` target")
    done = subprocess.run(
        ["make", "-s", "proto", f"PROTO_OUT={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return _files(out)


def test_the_generated_code_matches_the_proto_files(tmp_path: Path):
    fresh = _regenerate(tmp_path / "generated")
    committed = _files(GENERATED)
    assert sorted(fresh) == sorted(committed), "run `make proto`: the generated files differ"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run `make proto`: {stale} differ from what proto/ generates"


def test_create_billing_account_keeps_the_seeds_field_numbers():
    request = pb.CreateBillingAccountRequest.DESCRIPTOR
    response = pb.CreateBillingAccountResponse.DESCRIPTOR
    assert {f.name: f.number for f in request.fields if f.number <= 3} == {
        "patient_id": 1,
        "name": 2,
        "email": 3,
    }
    assert {f.name: f.number for f in response.fields if f.number <= 2} == {
        "account_id": 1,
        "status": 2,
    }
    assert request.file.package == "carelog.billing.v1"


def test_generated_messages_round_trip_on_the_wire():
    invoice = pb.CreateInvoiceRequest(
        account_id="a",
        currency_code="GBP",
        lines=[pb.InvoiceLine(description="Visit", quantity=2, unit_amount_minor=-1)],
        request_id="r",
    )
    assert pb.CreateInvoiceRequest.parse(bytes(invoice)) == invoice
