"""The official Anthropic Python SDK against tokengate's /v1/messages.

Run by tests/api/anthropic.rs with TOKENGATE_BASE_URL, TOKENGATE_TOKEN,
TOKENGATE_PUBLISH_TOKEN (a valid token without the `stream` scope) and
EXPECTED_TEXT set; exits non-zero (with the reason) on any mismatch.
"""

import os
import sys

import anthropic
from anthropic import Anthropic

base = os.environ["TOKENGATE_BASE_URL"]
token = os.environ["TOKENGATE_TOKEN"]
publish_token = os.environ["TOKENGATE_PUBLISH_TOKEN"]
expected = os.environ["EXPECTED_TEXT"]
messages = [{"role": "user", "content": expected}]

client = Anthropic(base_url=base, api_key=token, max_retries=0, timeout=20)

# Streaming: the SDK's helpers reassemble exactly the text.
with client.messages.stream(
    model="echo",
    max_tokens=1024,
    system="You are an echo.",
    messages=messages,
    metadata={"user_id": "sdk-user"},
    stop_sequences=["\n\nHuman:"],
    # Sampling options this SDK version no longer takes as arguments.
    extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5},
) as stream:
    pieces = list(stream.text_stream)
    final = stream.get_final_message()
text = "".join(pieces)
assert text == expected, f"streamed text {text!r} != {expected!r}"
assert len(pieces) > 1, "expected one delta per grapheme cluster"
assert final.stop_reason == "end_turn", final.stop_reason
assert final.role == "assistant" and final.type == "message", final
assert final.id.startswith("msg_"), final.id
assert final.model == "echo", final.model
assert [b.type for b in final.content] == ["text"], final.content
assert final.content[0].text == expected, final.content
assert final.usage.output_tokens == len(pieces), final.usage

# The raw events, as the SDK types them.
types = [e.type for e in client.messages.create(model="echo", max_tokens=64, messages=messages, stream=True)]
assert types[:2] == ["message_start", "content_block_start"], types
assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"], types
assert set(types[2:-3]) == {"content_block_delta"}, types

# Not streaming, with content blocks.
message = client.messages.create(
    model="echo",
    max_tokens=1024,
    messages=[{"role": "user", "content": [{"type": "text", "text": expected}]}],
)
assert message.content[0].text == expected, message
assert message.stop_reason == "end_turn", message.stop_reason
assert message.usage.output_tokens == len(pieces), message.usage

# A bad key is the SDK's authentication error, a missing scope its
# permission error, an unknown model its 404; each carries tokengate's code.
bad = Anthropic(base_url=base, api_key="not-a-jwt", max_retries=0)
try:
    bad.messages.create(model="echo", max_tokens=16, messages=messages)
    sys.exit("a bad key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401
    assert e.type == "authentication_error", e.body
    assert e.body["error"]["code"] == "malformed_token", e.body
try:
    with Anthropic(base_url=base, api_key=publish_token, max_retries=0).messages.stream(
        model="echo", max_tokens=16, messages=messages
    ) as s:
        s.until_done()
    sys.exit("a token without the stream scope was accepted")
except anthropic.PermissionDeniedError as e:
    assert e.status_code == 403
    assert e.type == "permission_error", e.body
try:
    client.messages.create(model="no-such-model", max_tokens=16, messages=messages)
    sys.exit("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.status_code == 404
    assert e.body["error"]["code"] == "model_not_found", e.body

print("anthropic sdk ok:", anthropic.__version__)
