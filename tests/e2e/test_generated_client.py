"""A client generated from the gateway's documents speaks to the gateway as documented.

openapi-python-client generates the patients and auth clients from `/api-docs/patients`
and `/api-docs/auth`, fetched from a gateway at test time; a warning from the generator
(a schema it cannot read, an answer it drops) fails the test, since a client would lose
that part of the contract. The generated functions then register, change and list a
patient with a bearer token, and meet a 400, a 409 and a 412 (and login's 401) as the
typed problem model.

The stack is this module's own (auth, command and query APIs, relay, directory
projection and a gateway, on an isolated database and topic prefix), so the documents
are the ones this checkout's code publishes.
"""

from __future__ import annotations

import datetime
import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from auth.service import DEV_EMAIL, DEV_PASSWORD
from tests.support.revocation import Stack, projected_stack

pytestmark = pytest.mark.e2e

GENERATOR_CONFIG = {"post_hooks": []}
"""No formatting after generation: the client is used as generated, whatever tools are on
PATH (a missing formatter would otherwise be reported as a warning)."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home: Path = tmp_path_factory.mktemp("generated-client")
    with projected_stack(home) as up:
        yield up


def generate(gateway: str, document: str, out: Path) -> ModuleType:
    """Generates the client of `/api-docs/<document>` into `out` and imports it; fails on
    any warning the generator reports."""
    package = f"generated_{document}_client"
    config = out / f"{document}-config.json"
    config.write_text(json.dumps(GENERATOR_CONFIG | {"package_name_override": package}))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--url",
            f"{gateway}/api-docs/{document}",
            "--meta",
            "none",
            "--config",
            str(config),
            "--output-path",
            str(out / package),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "encountered" not in report, report  # "Warning(s) encountered while generating"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module(package)
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def clients(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    assert stack.gateway is not None
    out = tmp_path_factory.mktemp("clients")
    return {name: generate(stack.gateway, name, out) for name in ("patients", "auth")}


def part(package: ModuleType, name: str) -> Any:
    """A module of the generated package, e.g. `api.patients.patients_register_patient`."""
    return importlib.import_module(f"{package.__name__}.{name}")


@pytest.fixture(scope="module")
def signed_in(stack: Stack, clients: dict[str, ModuleType]) -> Any:
    """The patients client with the development admin's bearer token, from the generated
    auth client's login."""
    auth = clients["auth"]
    login = part(auth, "api.default.auth_login_login")
    credentials = part(auth, "models").Credentials(email=DEV_EMAIL, password=DEV_PASSWORD)
    with auth.Client(base_url=stack.gateway, timeout=None) as anonymous:
        session = login.sync(client=anonymous, body=credentials)
    assert isinstance(session, part(auth, "models").SessionOut), session
    assert session.token
    return clients["patients"].AuthenticatedClient(
        base_url=stack.gateway, token=session.token, timeout=None
    )


def test_the_generated_client_registers_changes_and_lists_a_patient(clients, signed_in):
    patients = clients["patients"]
    models = part(patients, "models")
    register = part(patients, "api.patients.patients_register_patient")
    change = part(patients, "api.patients.patients_patient_id_change_patient")
    listing = part(patients, "api.patients.patients_list_patients")
    email = f"gen-{uuid.uuid4().hex[:12]}@example.org"
    details = models.PatientInput(
        name=f"Generated {uuid.uuid4().hex[:8]}",
        email=email,
        address="12 St James's Square",
        date_of_birth=datetime.date(1990, 12, 10),
        registered_date=datetime.date(2024, 1, 2),
    )

    created = register.sync_detailed(client=signed_in, body=details)
    assert created.status_code == 201, created.content
    patient = created.parsed
    assert isinstance(patient, models.PatientOut)
    assert isinstance(patient.id, uuid.UUID)
    assert patient.version == 1
    assert patient.email == email
    assert patient.registered_date == datetime.date(2024, 1, 2)
    assert isinstance(patient.position, int)
    etag = created.headers["ETag"]

    renamed = f"{details.name} Changed"
    details.name = renamed
    changed = change.sync_detailed(patient.id, client=signed_in, body=details, if_match=etag)
    assert changed.status_code == 200, changed.content
    updated = changed.parsed
    assert isinstance(updated, models.PatientOut)
    assert (updated.id, updated.version, updated.name) == (patient.id, 2, renamed)
    assert updated.position > patient.position

    stale = change.sync_detailed(patient.id, client=signed_in, body=details, if_match=etag)
    assert stale.status_code == 412, stale.content
    assert isinstance(stale.parsed, models.Problem)
    assert stale.parsed.status == 412

    page = listing.sync(client=signed_in, name=renamed, limit=10, min_position=updated.position)
    assert isinstance(page, models.PatientPage), page
    assert all(isinstance(row, models.PatientView) for row in page.patients)
    (found,) = [row for row in page.patients if row.id == patient.id]
    assert (found.name, found.email, found.version) == (renamed, email, 2)
    assert found.date_of_birth == datetime.date(1990, 12, 10)


def test_the_generated_client_meets_a_bad_body_and_a_duplicate_as_typed_problems(
    clients, signed_in
):
    patients = clients["patients"]
    models = part(patients, "models")
    register = part(patients, "api.patients.patients_register_patient")
    email = f"gen-{uuid.uuid4().hex[:12]}@example.org"
    details = models.PatientInput(
        name="Ada Lovelace",
        email=email,
        address="12 St James's Square",
        date_of_birth=datetime.date(1990, 12, 10),
        registered_date=datetime.date(2024, 1, 2),
    )
    bad = models.PatientInput(
        name="",
        email="not an email",
        address="12 St James's Square",
        date_of_birth=datetime.date(1990, 12, 10),
        registered_date=datetime.date(2024, 1, 2),
    )

    refused = register.sync_detailed(client=signed_in, body=bad)
    assert refused.status_code == 400, refused.content
    problem = refused.parsed
    assert isinstance(problem, models.Problem)
    assert problem.status == 400
    assert isinstance(problem.errors, models.ProblemErrors)
    messages = problem.errors.additional_properties
    assert {"name", "email"} <= set(messages)
    assert all(isinstance(message, str) and message for message in messages.values())

    first = register.sync_detailed(client=signed_in, body=details)
    assert first.status_code == 201, first.content
    again = register.sync_detailed(client=signed_in, body=details)
    assert again.status_code == 409, again.content
    conflict = again.parsed
    assert isinstance(conflict, models.Problem)
    assert conflict.status == 409
    assert conflict.detail


def test_the_generated_auth_client_meets_a_wrong_password_as_a_typed_401(stack, clients):
    auth = clients["auth"]
    models = part(auth, "models")
    login = part(auth, "api.default.auth_login_login")
    wrong = models.Credentials(email=f"gen-{uuid.uuid4().hex[:12]}@example.org", password="nope")
    with auth.Client(base_url=stack.gateway, timeout=None) as anonymous:
        answer = login.sync_detailed(client=anonymous, body=wrong)
    assert answer.status_code == 401, answer.content
    assert isinstance(answer.parsed, models.Problem)
    assert answer.parsed.status == 401
