//! `openai`: streams from any OpenAI-compatible chat completions server
//! (OpenAI, vLLM, llama.cpp server, Ollama's `/v1`, LM Studio, ...).
//!
//! The upstream's SSE is parsed with the crate's spec parser (lines and
//! UTF-8 sequences cut across network reads, comments, `data: [DONE]`,
//! error objects), and only text is handed on: the engine re-chunks it into
//! grapheme clusters like any generator's. Before the first byte, failures
//! are retried (bounded, with backoff) and then the next fallback upstream
//! is tried; after it, a failure ends the stream with an `error` whose code
//! says what happened. Dropping the stream drops the HTTP request, so an
//! upstream stops generating (and billing) as soon as nobody reads.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout_at};

use super::upstream::Upstream;
use super::{Chunk, GenerateRequest, Generator, GeneratorError, TextStream, Usage};
use crate::sse::{Event, Parser};

/// One upstream plus its fallbacks, as one generator.
#[derive(Debug, Clone)]
pub struct OpenAiGenerator {
    chain: Vec<(Arc<Upstream>, reqwest::Client)>,
    description: String,
}

fn upstream_error(code: &'static str, message: impl Into<String>) -> GeneratorError {
    GeneratorError::Upstream { code, message: message.into() }
}

/// A pre-first-byte failure, and whether retrying the same upstream may help.
struct Attempt {
    error: GeneratorError,
    retry: bool,
}

impl OpenAiGenerator {
    /// A generator for `primary`, falling back to `fallbacks` in order.
    pub fn new(primary: Arc<Upstream>, fallbacks: Vec<Arc<Upstream>>) -> Result<Self, reqwest::Error> {
        let description = format!("OpenAI-compatible upstream `{}` (model {})", primary.name, primary.model);
        let chain = std::iter::once(primary)
            .chain(fallbacks)
            .map(|u| {
                let client = reqwest::Client::builder().connect_timeout(u.connect_timeout).build()?;
                Ok((u, client))
            })
            .collect::<Result<_, reqwest::Error>>()?;
        Ok(Self { chain, description })
    }
}

fn messages_for(request: &GenerateRequest) -> Vec<Value> {
    let mut messages: Vec<Value> =
        request.messages.iter().map(|m| json!({ "role": m.role, "content": m.content })).collect();
    if !request.prompt.is_empty() {
        messages.push(json!({ "role": "user", "content": request.prompt }));
    }
    messages
}

async fn start(
    upstream: &Upstream,
    client: &reqwest::Client,
    body: &Value,
    deadline: Instant,
) -> Result<reqwest::Response, Attempt> {
    let mut req = client.post(&upstream.url).headers(upstream.headers.clone()).json(body);
    if let Some(key) = &upstream.api_key {
        req = req.bearer_auth(String::from_utf8_lossy(key.expose()));
    }
    let head_deadline = deadline.min(Instant::now() + upstream.first_byte_timeout);
    let response = match timeout_at(head_deadline, req.send()).await {
        Err(_) => {
            return Err(Attempt {
                error: upstream_error(
                    "upstream_first_byte_timeout",
                    format!("upstream `{}` did not answer in time", upstream.name),
                ),
                retry: true,
            });
        }
        Ok(Err(e)) if e.is_connect() || e.is_timeout() => {
            let code = if e.is_timeout() { "upstream_connect_timeout" } else { "upstream_connect_failed" };
            return Err(Attempt {
                error: upstream_error(code, format!("cannot reach upstream `{}`", upstream.name)),
                retry: true,
            });
        }
        Ok(Err(_)) => {
            return Err(Attempt {
                error: upstream_error(
                    "upstream_disconnected",
                    format!("upstream `{}` failed before answering", upstream.name),
                ),
                retry: true,
            });
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    // The body may explain. Only a JSON error message is passed on, short,
    // and with anything key-like masked: some upstreams quote the key they
    // were sent.
    let detail = match tokio::time::timeout(Duration::from_secs(2), response.text()).await {
        Ok(Ok(text)) => serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
            .map(|m| mask_keys(&m, upstream).chars().take(200).collect::<String>())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let name = &upstream.name;
    let (code, retry) = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ("upstream_unauthorized", false),
        StatusCode::NOT_FOUND => ("upstream_not_found", false),
        StatusCode::TOO_MANY_REQUESTS => ("upstream_rate_limited", false),
        s if s.is_server_error() => ("upstream_unavailable", true),
        _ => ("upstream_bad_request", false),
    };
    let mut message = format!("upstream `{name}` answered {status}");
    if let Some(after) = retry_after {
        message.push_str(&format!("; retry after {after} s"));
    }
    if !detail.is_empty() {
        message.push_str(&format!(": {detail}"));
    }
    Err(Attempt { error: upstream_error(code, message), retry })
}

/// Masks the configured key and any `sk-...`-like word in upstream text.
fn mask_keys(text: &str, upstream: &Upstream) -> String {
    let mut text = text.to_owned();
    if let Some(key) = &upstream.api_key {
        let key = String::from_utf8_lossy(key.expose()).into_owned();
        if !key.is_empty() {
            text = text.replace(&key, "[redacted]");
        }
    }
    text.split(' ')
        .map(|word| if word.starts_with("sk-") || word.len() > 40 { "[redacted]" } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Generator for OpenAiGenerator {
    fn description(&self) -> &str {
        &self.description
    }

    fn generate(&self, request: GenerateRequest) -> TextStream {
        let chain = self.chain.clone();
        Box::pin(async_stream::stream! {
            let total = chain.first().map_or(super::upstream::DEFAULT_TOTAL_TIMEOUT, |(u, _)| u.total_timeout);
            let deadline = Instant::now() + total;
            let mut last_error = upstream_error("upstream_unavailable", "no upstream configured");
            let mut started = None;
            'chain: for (upstream, client) in &chain {
                let mut body = json!({
                    "model": upstream.model,
                    "messages": messages_for(&request),
                    "stream": true,
                    "stream_options": { "include_usage": true },
                });
                if let (Value::Object(map), Ok(Value::Object(options))) = (&mut body, serde_json::to_value(&request.options)) {
                    map.extend(options);
                }
                for attempt in 0..=upstream.retries {
                    match start(upstream, client, &body, deadline).await {
                        Ok(response) => {
                            started = Some((upstream.clone(), response));
                            break 'chain;
                        }
                        Err(failed) => {
                            tracing::info!(upstream = %upstream.name, attempt, code = failed.error.code(), "upstream attempt failed");
                            last_error = failed.error;
                            if !failed.retry || attempt == upstream.retries {
                                break;
                            }
                            // 100 ms, 200 ms, 400 ms, ... within the total deadline.
                            let backoff = Duration::from_millis(100 << attempt.min(6));
                            if Instant::now() + backoff >= deadline {
                                break 'chain;
                            }
                            sleep(backoff).await;
                        }
                    }
                }
            }
            let Some((upstream, response)) = started else {
                yield Err(last_error);
                return;
            };
            let mut body = response.bytes_stream();
            let mut parser = Parser::new();
            let mut finished = false;
            loop {
                let idle = deadline.min(Instant::now() + upstream.idle_timeout);
                let next = match timeout_at(idle, body.next()).await {
                    Ok(next) => next,
                    Err(_) if Instant::now() >= deadline => {
                        yield Err(upstream_error("upstream_total_timeout", format!("upstream `{}` exceeded {}", upstream.name, humantime::format_duration(total))));
                        return;
                    }
                    Err(_) => {
                        yield Err(upstream_error("upstream_idle_timeout", format!("upstream `{}` sent nothing for {}", upstream.name, humantime::format_duration(upstream.idle_timeout))));
                        return;
                    }
                };
                let bytes = match next {
                    Some(Ok(bytes)) => bytes,
                    Some(Err(_)) | None if finished => return,
                    Some(Err(_)) | None => {
                        yield Err(upstream_error("upstream_disconnected", format!("upstream `{}` closed the stream before finishing", upstream.name)));
                        return;
                    }
                };
                for event in parser.feed(&bytes) {
                    let Event::Message { data, .. } = event else { continue };
                    if data.trim() == "[DONE]" {
                        return;
                    }
                    let value: Value = match serde_json::from_str(&data) {
                        Ok(value) => value,
                        Err(_) => {
                            yield Err(upstream_error("upstream_malformed", format!("upstream `{}` sent a chunk that is not JSON", upstream.name)));
                            return;
                        }
                    };
                    if let Some(error) = value.get("error") {
                        let message = error.get("message").and_then(Value::as_str).unwrap_or("unknown error");
                        yield Err(upstream_error("upstream_error", format!("upstream `{}`: {message}", upstream.name)));
                        return;
                    }
                    let choice = value.get("choices").and_then(|c| c.get(0));
                    let text = choice.and_then(|c| c.pointer("/delta/content")).and_then(Value::as_str).unwrap_or("");
                    if !text.is_empty() {
                        yield Ok(Chunk::Text(text.to_owned()));
                    }
                    if choice.and_then(|c| c.get("finish_reason")).is_some_and(|r| !r.is_null()) {
                        finished = true;
                    }
                    let usage = value.get("usage").filter(|u| !u.is_null()).and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok());
                    if let Some(usage) = usage {
                        yield Ok(Chunk::Usage(usage));
                    }
                }
            }
        })
    }
}
