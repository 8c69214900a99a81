"""The benchmark report: ratios against their targets, report.md, charts (``python -m benchmarks.report``)."""
