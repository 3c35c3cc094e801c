"""deploy/observability: the alerting rules and the Grafana dashboard parse, and every series they
query is one the services export (or the Redis exporter's, named below), so a renamed metric
cannot leave an alert silently dead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import prometheus_client
import promql_parser
import pytest
import yaml

import gateway.metrics
import persister.metrics
import shared.kafka
import sweeper.metrics

OBSERVABILITY = Path(__file__).resolve().parents[3] / "deploy" / "observability"
EXTERNAL = {"redis_memory_used_bytes", "redis_memory_max_bytes"}  # oliver006/redis_exporter


def exported() -> set[str]:
    """Every series name the services' metrics produce (counters' _total, histograms' _bucket ...)."""
    assert gateway.metrics and persister.metrics and sweeper.metrics and shared.kafka  # (registered on import)
    return set(prometheus_client.REGISTRY._names_to_collectors)


def selectors(expr: str) -> set[str]:
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)  # (parse raises on a syntax error)
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel["targets"]]


@pytest.mark.parametrize("expr", [r["expr"] for r in alert_rules()] + dashboard_exprs())
def test_every_query_parses_and_asks_for_series_that_exist(expr: str) -> None:
    names = selectors(expr)
    assert names, f"no series in {expr!r}"
    unknown = names - exported() - EXTERNAL
    assert not unknown, f"{expr!r} asks for series nobody exports: {sorted(unknown)}"


def test_alerts_say_what_they_mean_and_what_to_do() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    documented = (OBSERVABILITY.parents[1] / "docs" / "operations.md").read_text()
    assert [r["alert"] for r in rules if r["alert"] not in documented] == [], "every alert in docs/operations.md"


def test_the_dashboard_panels_are_distinct_and_on_the_datasource_variable() -> None:
    dash = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource"}
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
