//! The stream service: opening, resuming and cancelling streams, for every
//! route and dialect. Handlers parse and authorize their own request shape,
//! then call this; it checks the limits, asks the store for a log, starts
//! the producer and hands back the events that a dialect renders. Nothing
//! here knows which store runs or what the wire looks like.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;

use super::drive::DriveHook;
use super::produce::{RunContext, RunSettings, start};
use super::reader::{FollowSettings, follow, follow_driving};
use super::{EngineSettings, events};
use crate::auth::Principal;
use crate::config::{LimitsConfig, StreamConfig};
use crate::event::{Protocol, StreamEvent, StreamId};
use crate::generator::{GenerateRequest, Registry};
use crate::limits::{SlotRefused, StreamSlots};
use crate::metrics::Metrics;
use crate::quota::{QuotaError, Quotas};
use crate::shutdown::Shutdown;
use crate::store::{Located, Store, StoreError};
use crate::tickets::{self, Target};

/// The events of one stream as one connection receives them.
pub type EventStream = Pin<Box<dyn Stream<Item = Arc<StreamEvent>> + Send + 'static>>;

/// Why a stream could not be opened, resumed or cancelled.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// More chat messages than allowed.
    #[error("{count} chat messages exceed the limit of {limit}")]
    TooManyMessages {
        /// Messages sent.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The prompt (with the messages' contents) is too large.
    #[error("the prompt exceeds the limit of {limit} bytes")]
    PromptTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No generator of that name.
    #[error("unknown generator `{name}`; available: {}", .available.join(", "))]
    UnknownGenerator {
        /// What was asked for.
        name: String,
        /// What exists.
        available: Vec<String>,
    },
    /// The server is draining for shutdown.
    #[error("the server is shutting down")]
    Draining,
    /// No stream slot is free.
    #[error(transparent)]
    NoSlot(#[from] SlotRefused),
    /// The subject's usage budget is used up.
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// Unknown, expired, or another subject's stream (not told apart).
    #[error("no such stream")]
    NotFound,
    /// The shared store is known to be unreachable (its health probe
    /// failed): refused before anything is tried.
    #[error("the shared store is unavailable")]
    StoreUnavailable,
    /// A request to the shared store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The OS random number generator failed.
    #[error("OS RNG failed: {0}")]
    Rng(String),
}

/// What a new stream is asked for, in any dialect.
#[derive(Debug, Default)]
pub struct OpenRequest {
    /// What the generator gets.
    pub generate: GenerateRequest,
    /// The generator (or upstream, or alias) by name; the default if none.
    pub generator: Option<String>,
    /// The client's pace wish, clamped to the configured bounds.
    pub pace_ms: Option<u32>,
    /// How long generation continues without a client; the configured
    /// grace if `None`. Dialects whose clients cannot resume pass zero.
    pub detach_grace: Option<Duration>,
    /// The protocol the stream is served in (counted in the metrics).
    pub protocol: Protocol,
    /// The connection's offer to poll the producer itself (see
    /// [`super::drive`]); `None` spawns it.
    pub drive: Option<DriveHook>,
}

/// A stream that has started, with its first reader attached.
pub struct Opened {
    /// The stream's id.
    pub stream_id: StreamId,
    /// The generator's registry name.
    pub generator: String,
    /// Its events, from the first.
    pub events: EventStream,
}

/// The answer to a resume.
pub enum Resumed {
    /// The client already has every event of a finished stream.
    Complete,
    /// The events from the requested position on.
    Events(EventStream),
}

/// Settings the service applies to every stream.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Pacing, heartbeats, prompt size and the default generator.
    pub stream: StreamConfig,
    /// Message count, duration and flow-control bounds.
    pub limits: LimitsConfig,
    /// Default detach grace.
    pub detach_grace: Duration,
    /// The `retry:` hint sent with `shutdown`.
    pub shutdown_retry: Duration,
    /// How long a connection may outlive its token's `exp`.
    pub token_grace: Duration,
}

/// Opens, resumes and cancels streams. Cheap to clone.
#[derive(Clone)]
pub struct StreamService(Arc<ServiceParts>);

/// What the stream service works with.
pub struct ServiceParts {
    /// Limits and defaults for every stream.
    pub settings: ServiceSettings,
    /// The generators, by name.
    pub generators: Registry,
    /// Where stream logs live.
    pub store: Store,
    /// Stream slots (global and per subject).
    pub slots: Arc<StreamSlots>,
    /// Usage budgets, drawn on by every stream.
    pub quotas: Quotas,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Shutdown phases: no new streams while draining, `shutdown` to
    /// readers when closing.
    pub shutdown: Shutdown,
}

impl StreamService {
    /// A service over these parts.
    pub fn new(parts: ServiceParts) -> Self {
        Self(Arc::new(parts))
    }

    /// The usage quotas (for `GET /v1/usage`).
    pub fn quotas(&self) -> &Quotas {
        &self.0.quotas
    }

    /// The generators offered (for model listings).
    pub fn generators(&self) -> &Registry {
        &self.0.generators
    }

    /// Starts a generation. Everything is checked before the generator is
    /// asked for anything, so a refused request never starts work; callers
    /// check the scope first.
    pub async fn open(&self, caller: &Principal, request: OpenRequest) -> Result<Opened, StreamError> {
        let inner = &*self.0;
        let (cfg, limits) = (&inner.settings.stream, &inner.settings.limits);
        let generate = request.generate;
        if generate.messages.len() > limits.max_messages {
            return Err(StreamError::TooManyMessages { count: generate.messages.len(), limit: limits.max_messages });
        }
        let prompt_bytes = generate.prompt.len() + generate.messages.iter().map(|m| m.content.len()).sum::<usize>();
        if prompt_bytes > cfg.max_prompt_bytes {
            return Err(StreamError::PromptTooLarge { limit: cfg.max_prompt_bytes });
        }
        let name = request.generator.unwrap_or_else(|| cfg.default_generator.clone());
        let entry = inner
            .generators
            .get(&name)
            .ok_or_else(|| StreamError::UnknownGenerator { name: name.clone(), available: inner.generators.names() })?;
        if inner.shutdown.is_draining() {
            return Err(StreamError::Draining);
        }
        if !inner.store.is_healthy() {
            return Err(StreamError::StoreUnavailable);
        }
        // The budget before the slot: a subject over its quota should hear
        // that, not that it has too many streams open.
        let meter = inner.quotas.admit(caller).await?;
        let permit = inner.slots.acquire(&caller.subject).await?;
        let stream_id = StreamId::random().map_err(|e| StreamError::Rng(e.to_string()))?;
        tickets::bind(&inner.store, caller, Target::Stream(stream_id)).await?;
        let settings = EngineSettings {
            pace: cfg.pace.resolve(entry.pace, request.pace_ms),
            max_duration: limits.max_stream_duration,
        };
        tracing::debug!(subject = %caller.subject, generator = %name, %stream_id, "stream opened");
        // The first reader is attached before the producer starts. The
        // stream's stop token is a child of the server's closing token
        // (watched only when it fires, never locked per event).
        let (writer, cursor) = inner.store.create(stream_id, &caller.subject, &name, inner.shutdown.closing()).await?;
        let batch_ready = settings.pace.is_zero();
        let engine = events(stream_id, name.clone(), entry.generator.generate(generate), settings);
        let ctx = RunContext {
            subject: caller.subject.clone(),
            permit,
            slots: inner.slots.clone(),
            metrics: inner.metrics.clone(),
            meter: meter.map(Box::new),
        };
        let run = RunSettings {
            window: limits.send_queue,
            max_lag: limits.max_lag,
            detach_grace: request.detach_grace.unwrap_or(inner.settings.detach_grace),
            batch_ready,
        };
        let inline = start(engine, writer, ctx, run, request.drive.as_ref());
        inner.metrics.stream_opened(request.protocol);
        crate::request_line::stream_opened();
        let events = Box::pin(follow_driving(cursor, self.follow_settings_for(caller), inline));
        Ok(Opened { stream_id, generator: name, events })
    }

    /// Finds a stream the caller may see: its own, or any with `admin`.
    /// Another subject's stream is reported exactly like an unknown one.
    /// A stream ticket's first use is bound to the stream found (as to the
    /// one [`Self::open`] starts), which is what it may reconnect to.
    pub async fn locate(&self, caller: &Principal, id: &StreamId) -> Result<Located, StreamError> {
        match self.0.store.locate(id).await? {
            Some(located) if located.owner == caller.subject || caller.is_admin() => {
                tickets::bind(&self.0.store, caller, Target::Stream(*id)).await?;
                Ok(located)
            }
            _ => Err(StreamError::NotFound),
        }
    }

    /// Replays a located stream from sequence `from` and follows it live,
    /// for as long as `caller`'s token (and its grace) lasts.
    pub async fn resume(&self, caller: &Principal, located: Located, from: u64) -> Result<Resumed, StreamError> {
        Ok(match self.0.store.cursor(&located, from).await? {
            None => Resumed::Complete,
            Some(cursor) => Resumed::Events(Box::pin(follow(cursor, self.follow_settings_for(caller)))),
        })
    }

    /// Records stream `id` (just opened by `caller`) as the one answering
    /// the caller's chat `chat`, for [`Self::chat_stream`].
    pub async fn bind_chat(&self, caller: &Principal, chat: &str, id: StreamId) -> Result<(), StreamError> {
        Ok(self.0.store.bind_chat(&caller.subject, chat, id).await?)
    }

    /// The caller's chat `chat`'s stream while it runs; `None` when the chat
    /// has none, or its stream has finished or expired. Chats are the
    /// caller's own: the binding is kept per subject, so no subject finds
    /// (or shadows) another's chat by its id; the stream found is then
    /// checked like [`Self::locate`] does (its owner, or `admin`).
    pub async fn chat_stream(&self, caller: &Principal, chat: &str) -> Result<Option<Located>, StreamError> {
        let store = &self.0.store;
        let Some(id) = store.chat_stream(&caller.subject, chat).await? else { return Ok(None) };
        let located = match self.locate(caller, &id).await {
            Ok(located) => located,
            Err(StreamError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok((!store.is_finished(&located).await?).then_some(located))
    }

    /// Cancels a located stream wherever it runs: its generator (and any
    /// upstream request) is dropped and every reader gets `cancelled`.
    pub async fn cancel(&self, caller: &Principal, located: Located) -> Result<(), StreamError> {
        self.0.store.cancel(&located).await?;
        tracing::info!(stream_id = %located.id, subject = %caller.subject, "stream cancelled");
        Ok(())
    }

    /// How a connection of `caller` to a stream or channel behaves
    /// (heartbeats, shutdown, and its end when the caller's token expires,
    /// past the grace).
    pub fn follow_settings_for(&self, caller: &Principal) -> FollowSettings {
        let expires = UNIX_EPOCH + Duration::from_secs(caller.expires_at) + self.0.settings.token_grace;
        let left = expires.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        FollowSettings {
            heartbeat: self.0.settings.stream.heartbeat,
            closing: self.0.shutdown.closing().clone(),
            shutdown_retry_ms: self.0.settings.shutdown_retry.as_millis() as u64,
            token_deadline: Some(tokio::time::Instant::now() + left),
        }
    }
}
