// The Vercel AI SDK's own client code against a running tokengate: the
// `DefaultChatTransport` that `useChat` uses (it validates every chunk
// against `uiMessageChunkSchema`) and `readUIMessageStream`, which builds
// the message as `useChat` does and throws on a malformed part sequence.
//
// Environment: TOKENGATE_BASE_URL, TOKENGATE_TOKEN, EXPECTED_TEXT (a prompt
// the `echo` generator streams back; the server is paced so that a stream
// can be cut and resumed while it runs). Prints `ai sdk ok` on success.
import assert from "node:assert/strict";
import { DefaultChatTransport, readUIMessageStream } from "ai";

const base = process.env.TOKENGATE_BASE_URL;
const token = process.env.TOKENGATE_TOKEN;
const expected = process.env.EXPECTED_TEXT;
assert.ok(base && token && expected, "TOKENGATE_BASE_URL, TOKENGATE_TOKEN and EXPECTED_TEXT are required");

const transport = new DefaultChatTransport({
  api: `${base}/v1/ui/chat`,
  headers: { Authorization: `Bearer ${token}` },
  body: { model: "echo" },
});

const user = (text) => ({ id: "user-1", role: "user", parts: [{ type: "text", text }] });

/** Checks the part order the SDK relies on, chunk by chunk, and passes them on. */
function checked(seen) {
  const open = new Set();
  return new TransformStream({
    transform(chunk, controller) {
      seen.push(chunk);
      if (chunk.type === "text-start") open.add(chunk.id);
      if (chunk.type === "text-delta" || chunk.type === "text-end") {
        assert.ok(open.has(chunk.id), `${chunk.type} before its text-start: ${JSON.stringify(chunk)}`);
      }
      if (chunk.type === "text-end") open.delete(chunk.id);
      controller.enqueue(chunk);
    },
  });
}

/** The final message of a chunk stream, as `useChat` would build it. */
async function message(stream) {
  const seen = [];
  let last;
  // terminateOnError: an out-of-order part (or an `error` part) throws here.
  for await (const m of readUIMessageStream({ stream: stream.pipeThrough(checked(seen)), terminateOnError: true })) {
    last = m;
  }
  assert.ok(last, "no message was built");
  const text = last.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  return { text, seen, id: last.id };
}

function assertComplete({ text, seen }, what) {
  assert.equal(text, expected, `${what}: the text differs`);
  assert.equal(seen[0].type, "start", `${what}: first part`);
  const last = seen[seen.length - 1];
  assert.deepEqual(last, { type: "finish", finishReason: "stop" }, `${what}: last part`);
  const terminal = seen.filter((c) => ["finish", "error", "abort"].includes(c.type));
  assert.equal(terminal.length, 1, `${what}: exactly one terminal part`);
}

// 1. A whole answer through sendMessages: the exact text.
const chatA = `chat-a-${Date.now()}`;
const whole = await message(
  await transport.sendMessages({ chatId: chatA, messages: [user(expected)], trigger: "submit-message", messageId: undefined }),
);
assertComplete(whole, "sendMessages");
// Finished: nothing to resume.
assert.equal(await transport.reconnectToStream({ chatId: chatA }), null, "a finished chat's resume must be 204");

// 2. Cut mid-answer, then reconnect as `useChat({ resume: true })` does.
const chatB = `chat-b-${Date.now()}`;
const cut = new AbortController();
const first = await transport.sendMessages({
  chatId: chatB,
  messages: [user(expected)],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: cut.signal,
});
const reader = first.getReader();
let deltas = 0;
while (deltas < 3) {
  const { value, done } = await reader.read();
  assert.ok(!done, "the stream ended before it could be cut");
  if (value.type === "text-delta") deltas += 1;
}
cut.abort();
await reader.cancel().catch(() => {});
const resumed = await transport.reconnectToStream({ chatId: chatB });
assert.ok(resumed, "a running chat's resume must answer a stream, not 204");
const again = await message(resumed);
assertComplete(again, "reconnectToStream");
assert.equal(await transport.reconnectToStream({ chatId: chatB }), null, "after the finish the resume must be 204");

// 3. Regenerate: the same conversation answered again.
const regen = await message(
  await transport.sendMessages({
    chatId: chatA,
    messages: [user(expected)],
    trigger: "regenerate-message",
    messageId: whole.id,
  }),
);
assertComplete(regen, "regenerate-message");
assert.notEqual(regen.id, whole.id, "a new answer is a new message");

console.log("ai sdk ok");
