"""kd3 pipeline: configuration, stages and the `kd3` command line (the only code that reads params.yaml)."""
