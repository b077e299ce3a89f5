"""``mhc-plan``: the cluster overhead planner (hardware table, cost model, pipeline schedules, an
event simulator of one training step, and the search for the fastest setting that fits)."""
