"""The official OpenAI Python SDK against tokengate's /v1/chat/completions.

Run by tests/api/openai_compat.rs with TOKENGATE_BASE_URL, TOKENGATE_TOKEN
and EXPECTED_TEXT set; exits non-zero (with the reason) on any mismatch.
"""

import os
import sys

import openai
from openai import OpenAI

base = os.environ["TOKENGATE_BASE_URL"] + "/v1"
token = os.environ["TOKENGATE_TOKEN"]
expected = os.environ["EXPECTED_TEXT"]
messages = [{"role": "user", "content": expected}]

client = OpenAI(base_url=base, api_key=token, max_retries=0, timeout=20)

# Streaming, with usage: the SDK reassembles exactly the text.
text, content_chunks, usage, roles, finish = "", 0, None, [], None
for chunk in client.chat.completions.create(
    model="echo", messages=messages, stream=True, stream_options={"include_usage": True}
):
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            text += choice.delta.content
            content_chunks += 1
        if choice.finish_reason:
            finish = choice.finish_reason
assert text == expected, f"streamed text {text!r} != {expected!r}"
assert roles == ["assistant"], roles
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens > 0, usage
assert content_chunks > 1, "expected one chunk per grapheme cluster"

# Not streaming.
completion = client.chat.completions.create(model="echo", messages=messages)
assert completion.choices[0].message.content == expected, completion
assert completion.object == "chat.completion"

# Models.
ids = [m.id for m in client.models.list()]
assert "demo" in ids and "echo" in ids, ids

# A bad token is the SDK's authentication error; an unknown model its 404.
bad = OpenAI(base_url=base, api_key="not-a-jwt", max_retries=0)
try:
    bad.chat.completions.create(model="echo", messages=messages)
    sys.exit("a bad token was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    sys.exit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

print("openai sdk ok:", openai.__version__)
