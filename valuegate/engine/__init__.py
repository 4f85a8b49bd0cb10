"""The engine: For-Value's math and the model side (docs/ARCHITECTURE.md §2, §4).

torch, numpy and scipy only: nothing here imports Prefect, LanceDB or the pyarrow schemas of
the store, so the math can be read, tested and reused without the pipeline around it.
"""
