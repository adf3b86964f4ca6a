"""The pipeline that makes a UniCode model: data, stages 0 / I / II, evaluation, the CLI."""
