"""The quota service: the price book, balances, budgets, rate and concurrency limits, reserve ->
settle/release accounting, reconciliation and the channel catalog.

Start it with ``python -m services.quota``; ``app.run`` is the composition root.
"""
