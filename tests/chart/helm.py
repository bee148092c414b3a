"""The real Helm library (Helm v4's Go SDK, through helm-python-sdk) for tests/chart.rs.

    python helm.py render CHART_DIR VALUES_JSON RELEASE NAMESPACE   -> {"path": "manifest", ...}
    python helm.py lint CHART_DIR VALUES_JSON                       -> Helm's lint report
    python helm.py schema CHART_DIR VALUES_JSON                     -> {} or {"error": "..."}

Errors of the chart or the values go to stdout as {"error": "..."}, so the test can assert on
the message a user would see.
"""

import json
import sys

import helm_python as helm


def main() -> None:
    command, chart_dir, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        if command == "render":
            chart = helm.Chart.load(chart_dir)
            out = chart.render(values, name=sys.argv[4], namespace=sys.argv[5], is_install=True)
        elif command == "lint":
            out = helm.lint(chart_dir, values, strict=True)
        elif command == "schema":
            helm.Chart.load(chart_dir).validate_schema(values)
            out = {}
        else:
            raise SystemExit(f"unknown command {command}")
    except helm.HelmError as error:
        out = {"error": str(error)}
    print(json.dumps(out))


main()
