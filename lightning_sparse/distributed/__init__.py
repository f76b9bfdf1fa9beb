"""Planning and sharding, each table's route, sharded dynamic-table routing, collectives and checkpoint IO:
the distributed machinery under the Lightning strategy (``lightning_sparse.strategies``)."""
