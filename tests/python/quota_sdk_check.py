"""The official SDKs against a stream the quota cuts: each ends it the way
its protocol ends a token limit, and the explanation is readable.

Run by tests/api/quotas.rs against a server whose subject budget is
EXPECTED_CHARS characters; each part uses its own subject (its own token).
"""

import os
import sys

import anthropic
import openai

base = os.environ["TOKENGATE_BASE_URL"]
expected = int(os.environ["EXPECTED_CHARS"])
long_prompt = "z" * (expected * 3)

# openai: chat completions, streamed.
client = openai.OpenAI(base_url=f"{base}/v1", api_key=os.environ["TOKENGATE_TOKEN"], max_retries=0)
text, finish, note = "", None, None
with client.chat.completions.create(
    model="echo", stream=True, messages=[{"role": "user", "content": long_prompt}]
) as stream:
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish = choice.finish_reason
                note = (chunk.model_extra or {}).get("tokengate")
assert text == "z" * expected, text
assert finish == "length", finish
assert note and note["code"] == "quota_exceeded" and note["message"], note
# The next request is refused as a rate limit, with the code.
try:
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "again"}])
    sys.exit("the subject over its quota was not refused")
except openai.RateLimitError as e:
    assert "quota_exceeded" in str(e.body), e.body

# anthropic: messages, streamed, with another subject's token.
ac = anthropic.Anthropic(base_url=base, api_key=os.environ["TOKENGATE_TOKEN_2"], max_retries=0)
with ac.messages.stream(
    model="echo", max_tokens=1000, messages=[{"role": "user", "content": long_prompt}]
) as stream:
    got = "".join(stream.text_stream)
    message = stream.get_final_message()
assert got == "z" * expected, got
assert message.stop_reason == "max_tokens", message.stop_reason
try:
    ac.messages.create(model="echo", max_tokens=10, messages=[{"role": "user", "content": "again"}])
    sys.exit("the subject over its quota was not refused")
except anthropic.RateLimitError as e:
    assert "quota_exceeded" in str(e.body), e.body

print("quota sdk ok")
