"""Read models' contracts: the tables, rows and cache entries a projection writes and a
query API reads. Projections and query APIs share read models only through these modules.
"""
