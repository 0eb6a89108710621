"""The search: Optuna proposes, each trial is a named DVC experiment, val accuracy decides."""
