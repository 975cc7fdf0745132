"""The channel catalog: the upstream endpoints relays may send requests to, their credentials, and the
revision relays poll to learn of a change.

It has no process of its own: the quota process hosts :class:`~services.catalog.servicer.CatalogServicer`
on its gRPC port (``services.quota.app``). Clients reach it at ``RELAYGATE_CATALOG_ADDR``, which
defaults to quota's address, so moving it to a process of its own is a deployment change only.
"""
