"""Synthetic proxy tables: differentially private by default (a DP Gaussian copula turned into a table by SDV),
and, where a policy opts in and an admin approves, a non-DP SDV proxy checked for disclosure before release.

The gateway passes its engine (a `policies.reader.Reader`: compiled sqlglot trees in, rows out, on DuckDB or Spark)
and the dataset's policy; nothing here opens a database, imports an engine or imports the gateway.
"""

from synth.columns import ColumnBins, ProxySchema, proxy_schema
from synth.disclosure import check_release
from synth.measure import Allocation, allocate, measure
from synth.model import DPCopulaModel
from synth.proxy import DEFAULT_METHOD, DP_METHODS, METHODS, NON_DP_METHODS, dp_proxy, non_dp_proxy, sdv_metadata
from synth.report import dp_fidelity, non_dp_fidelity, render_pages

__all__ = [
    "Allocation",
    "ColumnBins",
    "DEFAULT_METHOD",
    "DP_METHODS",
    "DPCopulaModel",
    "METHODS",
    "NON_DP_METHODS",
    "ProxySchema",
    "allocate",
    "check_release",
    "dp_fidelity",
    "dp_proxy",
    "measure",
    "non_dp_fidelity",
    "non_dp_proxy",
    "proxy_schema",
    "render_pages",
    "sdv_metadata",
]
