"""The caller-facing formats the relay speaks besides OpenAI chat: Anthropic's Messages API and
OpenAI's Responses API.

The pipeline speaks OpenAI chat only, so each format is a pair of conversions around it: the caller's
request becomes a chat body (checked with the same limits as chat), the chat answer or stream becomes
the caller's answer or event stream, and the gateway's errors are rendered in the caller's error
shape. Nothing here does I/O: the HTTP routes (``edge/http/messages``, ``edge/http/responses``)
wire these conversions to the pipeline.
"""
