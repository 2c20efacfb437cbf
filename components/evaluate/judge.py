"""The optional judge: an OpenAI-compatible chat-completions endpoint that extracts answers where VLMEvalKit
uses a judge model (`vlpipe.components.evaluate.vlmevalkit`).

The API key is read from the environment variable the settings name, at request time, and is never logged or
recorded; the endpoint's URL and model are recorded with the metrics. Redirects are not followed (they would
carry the key elsewhere). Replies are cached by prompt (the N samples of an item often repeat), and bounded in
size and time.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

from vlpipe.components.evaluate.config import JudgeSettings

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1024 * 1024
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: following one would send the API key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class JudgeError(RuntimeError):
    """The judge endpoint refused the request for a reason a retry cannot fix (4xx: bad key, unknown model)."""


class OpenAIJudge:
    """Calls `<base_url>/chat/completions` with one user message at temperature 0; callable as
    `judge(prompt) -> reply or None` (None after every retry failed)."""

    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.calls = 0
        self._cache: dict[str, str | None] = {}

    def __call__(self, prompt: str) -> str | None:
        if prompt not in self._cache:
            self._cache[prompt] = self._request(prompt)
        return self._cache[prompt]

    def clear_cache(self) -> None:
        """Forget the cached replies; the evaluation keeps them per item, so an item's verdicts do not depend on
        the items evaluated before it in its shard."""
        self._cache.clear()

    def _request(self, prompt: str) -> str | None:
        s = self.settings
        body = json.dumps(
            {"model": s.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(s.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(s.max_retries + 1):
            self.calls += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=s.timeout_s) as response:
                    payload = json.loads(response.read(MAX_REPLY_BYTES + 1)[:MAX_REPLY_BYTES])
                content = payload["choices"][0]["message"]["content"]
                return content if isinstance(content, str) else None
            except urllib.error.HTTPError as exc:
                if exc.code not in _RETRY_STATUS:
                    raise JudgeError(
                        f"judge {s.base_url} (model {s.model!r}) answered HTTP {exc.code}; check the model name "
                        f"and the key in ${s.api_key_env}"
                    ) from None
                reason = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                reason = type(exc).__name__
            except (ValueError, KeyError, IndexError, TypeError):
                reason = "malformed reply"
            logger.warning("judge request %d/%d failed: %s", attempt + 1, s.max_retries + 1, reason)
            if attempt < s.max_retries:
                time.sleep(min(2.0**attempt, 10.0))
        return None
