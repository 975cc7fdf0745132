"""A fake LLM provider on loopback, for tests, demos and benchmarks.

It speaks OpenAI's API (``/v1/...``), Azure OpenAI's deployment paths, Anthropic's Messages API
and Gemini's ``generateContent``, each in its own wire format (see the ``*_api`` modules).

* :class:`FakeUpstream` - run it in a background thread of the current process;
* :class:`FakeUpstreamProcess` - run it as ``python -m services.fake_upstream`` in a child process;
* :class:`Behaviour` - what it does (latency, chunking, usage reporting, injected failures);
* :class:`FakeUpstreamApp` - the bare ASGI application.

Token counting rules are documented in :mod:`services.fake_upstream.tokens`; thinking text and the
signatures Anthropic and Gemini attach to it (and check when it comes back) in
:mod:`services.fake_upstream.thinking`.
"""

from .app import FakeUpstreamApp
from .behaviour import Behaviour, BehaviourError
from .process import FakeUpstreamProcess
from .server import FakeUpstream, serve
from .stats import StatsSnapshot

__all__ = [
    "Behaviour",
    "BehaviourError",
    "FakeUpstream",
    "FakeUpstreamApp",
    "FakeUpstreamProcess",
    "StatsSnapshot",
    "serve",
]
