"""The official OpenAI Python SDK against tokengate's Responses API.

Run by tests/api/responses.rs with TOKENGATE_BASE_URL, TOKENGATE_TOKEN and
EXPECTED_TEXT set (the server paces deltas, so a stream can be cut in the
middle); exits non-zero (with the reason) on any mismatch.
"""

import os

import openai
from openai import OpenAI

base = os.environ["TOKENGATE_BASE_URL"] + "/v1"
token = os.environ["TOKENGATE_TOKEN"]
expected = os.environ["EXPECTED_TEXT"]

client = OpenAI(base_url=base, api_key=token, max_retries=0, timeout=20)

# create(stream=True): the raw events, in order, with the exact text.
text, kinds, numbers = "", [], []
for event in client.responses.create(model="echo", input=expected, stream=True):
    kinds.append(event.type)
    numbers.append(event.sequence_number)
    if event.type == "response.output_text.delta":
        text += event.delta
assert text == expected, f"streamed text {text!r} != {expected!r}"
assert kinds[:4] == [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
], kinds[:4]
assert kinds[-4:] == [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
], kinds[-4:]
assert numbers == list(range(len(numbers))), numbers
assert kinds.count("response.output_text.delta") > 1, "expected one delta per grapheme cluster"

# responses.stream(...) with the SDK's own accumulation.
with client.responses.stream(
    model="echo", input=[{"role": "user", "content": [{"type": "input_text", "text": expected}]}], instructions="be exact"
) as stream:
    streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert streamed == expected, f"helper stream {streamed!r}"
assert final.output_text == expected, f"final response {final.output_text!r}"
assert final.status == "completed", final.status
assert final.usage is not None and final.usage.output_tokens > 0, final.usage

# A resume after a cut: read a few deltas, drop the connection, then the
# SDK's responses.stream(response_id=..., starting_after=N) gives the rest.
seen, last, response_id = "", None, None
raw = client.responses.create(model="echo", input=expected, stream=True)
for event in raw:
    last = event.sequence_number
    if event.type == "response.created":
        response_id = event.response.id
    if event.type == "response.output_text.delta":
        seen += event.delta
        if len(seen) >= 3:
            break
raw.close()
assert response_id and response_id.startswith("resp_"), response_id
assert seen and expected.startswith(seen), seen
with client.responses.stream(response_id=response_id, starting_after=last) as resumed:
    rest_events = list(resumed)
    rest = "".join(e.delta for e in rest_events if e.type == "response.output_text.delta")
    resumed_final = resumed.get_final_response()
assert seen + rest == expected, f"cut after {seen!r}, resumed {rest!r}"
assert all(e.sequence_number > last for e in rest_events), "the SDK dropped what it had"
assert resumed_final.output_text == expected, resumed_final.output_text

# Non-streaming create and retrieve.
created = client.responses.create(model="echo", input=expected)
assert created.output_text == expected, created.output_text
assert created.status == "completed", created.status
again = client.responses.retrieve(created.id)
assert again.id == created.id and again.output_text == expected, again

# Bad tokens and unknown models raise the SDK's own errors.
try:
    OpenAI(base_url=base, api_key="not-a-jwt", max_retries=0).responses.create(model="echo", input="x")
    raise AssertionError("a bad token was accepted")
except openai.AuthenticationError:
    pass
try:
    client.responses.create(model="no-such-model", input="x")
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass

print("responses sdk ok")
