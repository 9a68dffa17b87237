"""Schema-driven fuzzing of the whole HTTP API with schemathesis, against a real server over HTTP.

Every operation in GET /openapi.json gets generated requests (valid and invalid), sent with the admin
token. Checks: no 5xx, every status code is documented for its operation, bodies conform to the
declared response schema and content type. The number of examples per operation is bounded so the
whole module stays around a minute on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install 'schemathesis>=4.32,<5'")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Server, ServerFactory, fresh_postgres_database, upload  # noqa: E402
from tests.hardening.helpers import AUTH, TOKEN, start_bounded  # noqa: E402
from tests.onnx_models import mlp  # noqa: E402

#: generated examples per operation (there are about 30 operations)
EXAMPLES = 60
#: status codes seen, for the report
STATUSES: dict[int, int] = {}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fuzz_server(request: pytest.FixtureRequest, server_factory: ServerFactory) -> Iterator[Server]:
    env = {"SLIMSERVE_ADMIN_TOKEN": TOKEN, "SLIMSERVE_MAX_UPLOAD_BYTES": str(4 << 20)}
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            env["SLIMSERVE_DATABASE_URL"] = stack.enter_context(fresh_postgres_database("slimserve_fuzz"))
        s = server_factory(start=False, **env)
        start_bounded(s)
        with s.client(TOKEN) as c:
            # something for the generated names to find now and then
            assert upload(c, "a", mlp()).status_code == 201
            assert upload(c, "0", mlp()).status_code == 201
        yield s
        s.stop()  # before the database is dropped


def _fuzz_operation(operation, mode: GenerationMode, base_url: str) -> str | None:  # type: ignore[no-untyped-def]
    """Run the generated cases of one operation; returns the first failure, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure as found
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    def run(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS, timeout=30)
        STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1

    try:
        run()
    except Unsatisfiable:
        return None  # nothing to negate (an operation without parameters or body)
    except (Exception, BaseExceptionGroup) as e:  # schemathesis raises its own failure types
        return f"{operation.label} [{mode.value}]: {type(e).__name__}: {str(e)[:1500]}"
    return None


# The pytest plugin (schemathesis.pytest.from_fixture) reads Function._nodeid, which pytest 9 removed,
# so the operations are driven here with Hypothesis directly, and every failing operation is reported.
@pytest.mark.slow
def test_api_conforms_to_its_schema(fuzz_server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    failures = []
    STATUSES.clear()
    t0 = time.monotonic()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failure = _fuzz_operation(operation, mode, fuzz_server.url)
            if failure:
                failures.append(failure)
    elapsed = time.monotonic() - t0
    sent = sum(STATUSES.values())
    print(
        f"fuzzed {len(operations)} operations, {sent} requests in {elapsed:.1f}s; statuses {sorted(STATUSES.items())}"
    )
    assert sent >= len(operations) * EXAMPLES // 2  # the generators really ran
    assert not failures, "\n\n".join(failures)


def test_server_survived_the_fuzzing(fuzz_server: Server) -> None:
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None
    log = fuzz_server.log.read_text() if fuzz_server.log else ""
    assert "unhandled error" not in log, log[-3000:]
    with fuzz_server.client(TOKEN) as c:
        assert c.get("/v2/health/ready").status_code == 200
