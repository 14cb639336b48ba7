"""Benchmarks for scconv-triton: traffic / launch / saved-bytes meter and the main-job report.

``benchmarks.meter`` counts launches and bytes of any callable (eager aten ops and
Triton launches under the interpreter) and the bytes autograd saves for backward;
``benchmarks/run.py`` is the report (see benchmarks/README.md).
"""
