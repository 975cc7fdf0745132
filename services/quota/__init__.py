"""The quota service: the price book, balances, budgets, rate and concurrency limits, reserve ->
settle/release accounting and reconciliation. Its process also hosts the channel catalog
(:mod:`services.catalog`).

Start it with ``python -m services.quota``; ``app.run`` is the composition root.
"""
