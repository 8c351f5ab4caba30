"""Labeling functions on data nobody sees: declarative LFs compiled to one statement (`specs`, `matrix`),
reviewed Python LFs run in a sandboxed worker (`registry`, `sandbox`), DP statistics (`statistics`), the label
model fitted on a DP histogram over the public domain of vote patterns (`patterns`, `label_model`), one request
end to end (`analysis`) and client-side frames (`report`).

Depends only on `policies`: the gateway hands in its engine (a `policies.reader.Reader`: compiled sqlglot trees in,
rows out, on DuckDB or Spark) and the dataset's policy.
"""
