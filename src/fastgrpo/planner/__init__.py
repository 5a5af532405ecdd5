"""The TP/DP planner: which tensor x data parallel layout of the server to run.

    model.py    the performance model (pure): memory, throughput, the recommendation
    tables.py   the GPUs and models it knows (datasheets, configs)
    cli.py      the `fastgrpo tp-dp` command
    measure.py  --measure: every layout on the real server, against the prediction
"""
