"""The admin web console, served by the relay at ``/console/``.

**Approach.** A small static application in plain JavaScript (ES modules, no build step) plus one
vendored charting library (uPlot, minified, with its licence, in ``static/vendor/``). The relay serves
the files from this package's data; nothing is fetched from a CDN, so it works offline. We chose this
over server-rendered templates because every page is a view of the admin API: the browser calls the
API, so the console can show and do exactly what the API allows, no more, and the relay gains no
template engine dependency and no second rendering of the admin data.

**Session.** Signing in posts an admin key to ``POST /console/session``; the console exchanges it at
``POST /admin/v1/tokens`` for the usual admin token, asking for 8 hours (``session.SESSION_TTL_S``; auth
caps it at its maximum lifetime), and keeps the token in an ``HttpOnly; SameSite=Strict`` cookie
(``Secure`` when the request or the page's origin is HTTPS), path ``/console/``. The key itself is never
stored. Signing out (``DELETE /console/session``) ends the token at auth (``DELETE /admin/v1/tokens``),
not only the cookies. The page calls ``/console/api/<route>``, which becomes
``/admin/v1/<route>`` with ``Authorization: Bearer <token>``: the admin API's own scope checks decide
every action (a read-only token cannot write; the page only hides what it cannot do).

**CSRF.** Double-submit token plus SameSite: signing in also sets a random, script-readable
``rg_console_csrf`` cookie; every request that is not GET/HEAD must echo it in ``X-Console-CSRF`` and,
when the browser sends ``Origin``, come from this host. Another site can neither read the cookie nor
send the header without a CORS preflight, which the relay never grants.

**Hot path.** The relay's front dispatches its OpenAI routes from an exact-match table first; the
console is reached only on the fall-through branch where unknown paths go to FastAPI, so API calls pay
nothing for it.
"""

from __future__ import annotations

from services.console.asgi import PREFIX, Console

__all__ = ["PREFIX", "Console"]
