"""Azure OpenAI: OpenAI's own bodies, answers and streams under a deployment path.

``{base}/openai/deployments/{deployment}{path}?api-version={version}`` with the key in ``api-key``
(https://learn.microsoft.com/en-us/azure/ai-services/openai/reference). The deployment is the
channel's model map entry for the requested model (the model name itself without one). Nothing is
converted, so every endpoint Azure serves goes through, with the pass-through code's usage reading.
"""

from __future__ import annotations

import urllib.parse

from services.relay.providers.base import Provider

__all__ = ["AZURE", "AzureProvider"]


class AzureProvider(Provider):
    kind = "azure-openai"
    converts = False

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key} if api_key else {}

    def target(self, prefix: bytes, path: bytes, model: str, *, stream: bool, api_version: str) -> bytes:
        deployment = urllib.parse.quote(model, safe="-._~").encode()
        query = urllib.parse.urlencode({"api-version": api_version}).encode()
        return prefix + b"/openai/deployments/" + deployment + path + b"?" + query

    def serves(self, path: bytes) -> bool:
        return True


AZURE = AzureProvider()
