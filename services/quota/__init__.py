"""The quota service: the price book, balances, reserve -> settle/release accounting and the channel catalog.

Start it with ``python -m services.quota``; ``app.run`` is the composition root.
"""
