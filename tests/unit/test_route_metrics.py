"""Every HTTP service's request metrics: counted and timed by method, route template,
status code and app name, with errors (5xx) counted apart and requests in progress; the
health and metrics routes are not counted."""

from __future__ import annotations

import re
import uuid

from litestar import get, post
from litestar.exceptions import NotFoundException
from litestar.testing import AsyncTestClient

from runtime.http import service_app


def _samples(text: str, app_name: str) -> dict[str, float]:
    """The samples of `app_name`'s series, by metric name and labels (sorted)."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(carelog_http_\w+)\{(.*)\} (\S+)$", line)
        if match and f'app_name="{app_name}"' in match.group(2):
            labels = ",".join(sorted(match.group(2).split(",")))
            found[f"{match.group(1)}{{{labels}}}"] = float(match.group(3))
    return found


async def test_requests_are_counted_and_timed_by_route_template_and_status():
    @get("/things/{thing_id:int}", sync_to_thread=False)
    def thing(thing_id: int) -> dict[str, int]:
        if thing_id == 0:
            raise NotFoundException("no such thing")
        return {"id": thing_id}

    @post("/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("boom")

    name = f"metrics-{uuid.uuid4().hex[:8]}"
    app = service_app(name, [thing, boom], title="t", description="t")
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        for path in ("/things/1", "/things/2", "/things/0", "/health/live"):
            await client.get(path)
        assert (await client.post("/boom")).status_code == 500
        samples = _samples((await client.get("/metrics")).text, name)

    def key(metric: str, method: str, path: str, status: int) -> str:
        labels = [
            f'app_name="{name}"',
            f'method="{method}"',
            f'path="{path}"',
            f'status_code="{status}"',
        ]
        return f"{metric}{{{','.join(sorted(labels))}}}"

    template = "/things/{thing_id}"
    assert samples[key("carelog_http_requests_total", "GET", template, 200)] == 2
    assert samples[key("carelog_http_requests_total", "GET", template, 404)] == 1
    assert samples[key("carelog_http_requests_total", "POST", "/boom", 500)] == 1
    assert samples[key("carelog_http_requests_error_total", "POST", "/boom", 500)] == 1
    assert key("carelog_http_requests_error_total", "GET", template, 404) not in samples
    assert samples[key("carelog_http_request_duration_seconds_count", "GET", template, 200)] == 2
    assert samples[key("carelog_http_request_duration_seconds_sum", "GET", template, 200)] > 0
    # In progress: labelled as started (status 200), back to none once answered.
    assert samples[key("carelog_http_requests_in_progress", "GET", template, 200)] == 0
    assert samples[key("carelog_http_requests_in_progress", "POST", "/boom", 200)] == 0
    assert not any("/health" in k or "/metrics" in k for k in samples)
