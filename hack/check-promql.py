"""Parses every PromQL expression in deploy/monitoring with a real PromQL parser.

Usage: python hack/check-promql.py   (needs the PyPI packages promql-parser and PyYAML)
Exit 0 when all parse, 1 with the failing expression otherwise. Grafana's variables in the
dashboard are replaced by sample values first.
"""
import json
import pathlib
import sys

import promql_parser
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$claudekey": ".*",
    "$input_price": "3",
    "$output_price": "15",
}


def expressions():
    rule = yaml.safe_load((ROOT / "deploy/monitoring/prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            yield f"rule {r['alert']}", r["expr"]
    dash = json.loads((ROOT / "deploy/monitoring/grafana-dashboard.json").read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            if "$" in expr:
                raise SystemExit(f"panel {panel['title']}: unknown Grafana variable in {expr}")
            yield f"panel {panel['title']}", expr


def main():
    count = 0
    for where, expr in expressions():
        try:
            promql_parser.parse(expr)
        except ValueError as e:
            print(f"{where}: {e}\n{expr}", file=sys.stderr)
            return 1
        count += 1
    print(f"{count} PromQL expressions parse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
