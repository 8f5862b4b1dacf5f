"""Property-based run of every operation of the OpenAPI schema against the live server:
no server errors, documented status codes and content types, responses matching their schemas,
and auth enforced (schemathesis' ``ignored_auth`` retries without the token)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import AUTH, FLEET, LiveApi, start_server

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, ignored_auth]


@pytest.fixture(scope="module")
def live(redis_url: str) -> Iterator[LiveApi]:
    import uuid

    from allocator import Allocator
    from allocator.api.config import ApiConfig
    from allocator.api.tasks import TaskRegistry

    from .conftest import TOKEN

    a = Allocator(redis_url, namespace="test-api-st-" + uuid.uuid4().hex[:8])
    server = start_server(a, ApiConfig(token=TOKEN, policy_modules=("tests.api.policy_plugins",)),
                          TaskRegistry({"add": "tests.api.task_funcs:add"}))
    for h in FLEET:
        a.register_host(h)
    yield server
    server.stop()
    a.destroy()
    a.redis.close()


@pytest.fixture(scope="module")
def api_schema(live: LiveApi) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


def _operations() -> list[str]:
    """Operation labels, from the app's schema built offline (no server, no Redis call), so each
    operation is its own test. (schemathesis' pytest plug-in does not collect under pytest 9.2.)"""
    import redis

    from allocator import Allocator
    from allocator.api.app import create_app
    from allocator.api.config import ApiConfig
    from allocator.api.tasks import TaskRegistry

    app = create_app(Allocator(client=redis.Redis()), ApiConfig(), TaskRegistry({}, include_shared=False))
    return [f"{m.upper()} {p}" for p, ops in app.openapi()["paths"].items() for m in ops]


@pytest.mark.parametrize("label", _operations())
def test_operation(api_schema: schemathesis.BaseSchema, label: str) -> None:
    op = api_schema.find_operation_by_label(label)
    assert op is not None, label

    @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    check()
