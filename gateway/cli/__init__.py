"""The `bastion` command line: one typer module per capability (queries and admin in `main`, `audit`, `lf`,
`synth`), with the HTTP client's rendering in `terminal`."""
