"""The users API fuzzed from its own OpenAPI document (users_backend/openapi.json,
served at /openapi.json) with schemathesis, through a real lb in front of both
backends of the session's stack: data the document allows and data it does not,
for every operation. Every answer must be what the document says (its status
among the documented ones, its content type, its body's schema, a 4xx for data
the document refuses), and never a 5xx. Data the document allows may still be
refused with a documented 400: some rules are not JSON Schema's to say (a
birthdate no later than today, a name not all blanks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.lbctl import Lb, Upstream, write_config
from tests.stackctl import StackHandle, free_ports

EXAMPLES = 150  # per operation and mode: about 2,000 requests in all


@pytest.fixture(scope="module")
def entry(stack: StackHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work: Path = tmp_path_factory.mktemp("api-fuzz")
    port, admin = free_ports(2)
    backends = [
        Upstream(f"users-backend-{i + 1}", stack.ports.backend(i), work / f"b{i}.log")
        for i in range(2)
    ]
    lb = Lb(port, admin, work / "lb.toml", work / "lb.log")
    write_config(lb.config, port, admin, backends)
    try:
        lb.start()
        yield lb
    finally:
        lb.stop()
    assert "Traceback" not in lb.log_text()


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        # a JSON number past Python's 4,300-digit int conversion: once a 500
        ("POST", "/user/register", b'{"first_name": ' + b"9" * 5_000 + b"}"),
        # nesting past the parser's recursion limit: once a 500
        ("POST", "/login", b"[" * 50_000),
        # a target past aiohttp's 8,190-byte line, within lb's 16 KiB head: once
        # aiohttp's plain-text 400 quoting its parser
        ("GET", "/user/get/" + "a" * 10_000, b""),
        ("GET", "/user/search?first_name=" + "%D0%98" * 1_500 + "&last_name=x", b""),
    ],
    ids=["long-number", "deep-nesting", "long-path", "long-query"],
)
def test_hostile_bodies_and_targets_get_the_services_json_400(
    entry: Lb, method: str, target: str, body: bytes
) -> None:
    headers = {"Content-Type": "application/json"}
    r = requests.request(method, entry.url + target, data=body, headers=headers, timeout=10)
    assert r.status_code == 400, r.text[:300]
    assert r.headers["Content-Type"].startswith("application/json")
    assert set(r.json()) == {"message", "request_id", "code"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_the_documented_one(entry: Lb, mode: GenerationMode) -> None:
    # (schemathesis's own pytest loader from a fixture does not run on pytest 9:
    # the operations are driven here, each with its own hypothesis run)
    api = schemathesis.openapi.from_url(entry.url + "/openapi.json")
    before = sum(s["total"] for s in entry.status()["pools"]["http"])
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/user/register", "/login", "/user/get/{id}"}
    with requests.Session() as session:
        for operation in operations:
            takes = operation.definition.raw.keys() & {"parameters", "requestBody"}
            if mode == GenerationMode.NEGATIVE and not takes:
                continue  # nothing to send wrong

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def answers_as_documented(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    base_url=entry.url,
                    session=session,
                    timeout=10,
                    excluded_checks=[positive_data_acceptance],
                )

            answers_as_documented()
    # not vacuous: the operations were called, many times each
    sent = sum(s["total"] for s in entry.status()["pools"]["http"]) - before
    assert sent > len(operations) * EXAMPLES // 3, sent
