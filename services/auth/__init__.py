"""auth: users, API keys stored as keyed hashes, and key verification (``relaygate.auth.v1.AuthService``).

Start with ``__main__`` → ``settings`` → ``app``; ``servicer`` answers the RPCs; ``keys``, ``store``,
``cache`` and ``bootstrap`` are the nouns behind it. Kept import-free so that loading ``models`` (as the
migrations do) pulls in nothing else.
"""
