"""Priority over HTTP: the body's ``priority`` or an ``X-Priority`` header on every engine route, OpenAI-shaped 400s
naming ``priority`` outside 0-999, and the per-priority queue gauge in /metrics."""

from __future__ import annotations

import httpx
import pytest

ROUTES = [("/v1/embeddings", {"model": "m", "input": ["a"]}), ("/embed", {"inputs": "a"}),
          ("/v2/embed", {"texts": ["a"], "input_type": "search_query"})]


@pytest.mark.parametrize("route, body", ROUTES)
def test_a_priority_in_the_body_or_a_header_is_accepted(server, route, body):
    assert httpx.post(server.url + route, json={**body, "priority": 0}, timeout=30).status_code == 200
    r = httpx.post(server.url + route, json=body, headers={"X-Priority": "999"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route, body", ROUTES)
@pytest.mark.parametrize("priority, header", [(1000, None), (-1, None), (None, "soon"), (None, "1000")])
def test_a_priority_outside_0_to_999_is_a_400_naming_it(server, route, body, priority, header):
    sent = body if priority is None else {**body, "priority": priority}
    r = httpx.post(server.url + route, json=sent, headers={"X-Priority": header} if header else {}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text


def test_metrics_carry_the_queue_by_priority(server):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert "# TYPE embedserve_model_queue_inputs_by_priority gauge" in text
