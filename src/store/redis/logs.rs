//! Stream logs in Redis: each stream's events as a Redis Stream (entry ids
//! `0-{seq+1}`, so `XRANGE` by sequence number is exact), trimmed with
//! `MAXLEN ~`, and its owner and generator in a hash.

use std::collections::HashMap;
use std::sync::Arc;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::super::keys;
use super::{Entries, LEASE, RedisStore};
use crate::event::{ErrorCode, FinishReason, StreamEvent, StreamId, Usage};
use crate::store::StoreError;

/// A stream's owner and generator, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::store) struct RemoteMeta {
    /// Owning subject.
    pub(in crate::store) owner: String,
}

/// The stored form of a logged event (compact field names: one per char).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t")]
enum Stored {
    #[serde(rename = "s")]
    Start { g: String },
    #[serde(rename = "d")]
    Delta { x: String },
    #[serde(rename = "f")]
    Done {
        n: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        u: Option<Usage>,
    },
    /// The code as its wire string: a code written by a newer replica that
    /// this one does not know reads as `internal`, not as a lost event.
    #[serde(rename = "e")]
    Error { c: String, m: String },
}

fn encode(event: &StreamEvent) -> Option<String> {
    let stored = match event {
        StreamEvent::Start { generator, .. } => Stored::Start { g: generator.clone() },
        StreamEvent::Delta { text, .. } => Stored::Delta { x: text.clone() },
        StreamEvent::Done { chars, usage, .. } => Stored::Done { n: *chars, u: *usage },
        StreamEvent::Error { code, message, .. } => Stored::Error { c: code.as_str().to_owned(), m: message.clone() },
        StreamEvent::Shutdown { .. } | StreamEvent::Heartbeat => return None,
    };
    serde_json::to_string(&stored).ok()
}

fn decode(stream_id: StreamId, seq: u64, json: &str) -> Option<StreamEvent> {
    Some(match serde_json::from_str::<Stored>(json).ok()? {
        Stored::Start { g } => StreamEvent::Start { stream_id, generator: g },
        Stored::Delta { x } => StreamEvent::Delta { stream_id, seq, text: x },
        Stored::Done { n, u } => {
            StreamEvent::Done { stream_id, seq, finish_reason: FinishReason::Stop, chars: n, usage: u }
        }
        Stored::Error { c, m } => {
            StreamEvent::Error { stream_id, seq, code: ErrorCode::parse(&c).unwrap_or(ErrorCode::Internal), message: m }
        }
    })
}

impl RedisStore {
    /// The last logged event's sequence number and whether it is terminal.
    pub(in crate::store) async fn last_event(&self, id: &StreamId) -> Result<Option<(u64, bool)>, StoreError> {
        Ok(self.newest(&keys::stream(id)).await?.and_then(|(entry_id, fields)| {
            let seq = keys::seq_of(&entry_id)?;
            let event = fields.get(keys::EVENT).and_then(|json| decode(*id, seq, json))?;
            Some((seq, event.is_terminal()))
        }))
    }

    /// Records a new stream and takes its lease.
    pub(in crate::store) async fn create_stream(
        &self,
        id: &StreamId,
        owner: &str,
        generator: &str,
    ) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .hset_multiple(keys::meta(id), &[(keys::OWNER, owner), (keys::GENERATOR, generator)])
            .ignore()
            .expire(keys::meta(id), self.settings.running_ttl_secs())
            .ignore()
            .set_ex(keys::lease(id), 1, LEASE.as_secs())
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Appends events (consecutive, in order) to a stream's log.
    pub(in crate::store) async fn append(&self, id: &StreamId, events: &[Arc<StreamEvent>]) -> Result<(), StoreError> {
        let key = keys::stream(id);
        // Atomic: the terminal event and the lease's removal are seen
        // together, so a reader never mistakes a finished stream for a
        // lost one.
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut finished = false;
        for event in events {
            let (Some(seq), Some(json)) = (event.seq(), encode(event)) else {
                continue;
            };
            finished |= event.is_terminal();
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.settings.stream_max_events)
                .arg(keys::entry_id(seq))
                .arg(keys::EVENT)
                .arg(json)
                .ignore();
        }
        let ttl = self.settings.stream_ttl_secs();
        if finished {
            // Finished: resumable for the TTL, no lease needed any more.
            pipe.expire(&key, ttl).ignore().expire(keys::meta(id), ttl).ignore().del(keys::lease(id)).ignore();
        } else {
            pipe.expire(&key, self.settings.running_ttl_secs()).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    /// The stream's owner, if Redis still holds the stream.
    pub(in crate::store) async fn meta(&self, id: &StreamId) -> Result<Option<RemoteMeta>, StoreError> {
        let map: HashMap<String, String> = self.conn().hgetall(keys::meta(id)).await?;
        Ok(match (map.get(keys::OWNER), map.get(keys::GENERATOR)) {
            (Some(owner), Some(_)) => Some(RemoteMeta { owner: owner.clone() }),
            _ => None,
        })
    }

    /// Events from `from` on (up to `count`); `Err(first)` when `from` was
    /// trimmed away.
    pub(in crate::store) async fn read(
        &self,
        id: &StreamId,
        from: u64,
        count: usize,
    ) -> Result<Result<Vec<StreamEvent>, u64>, StoreError> {
        let entries: Entries = redis::cmd("XRANGE")
            .arg(keys::stream(id))
            .arg(keys::entry_id(from))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (entry_id, fields) in entries {
            let Some(seq) = keys::seq_of(&entry_id) else { continue };
            if out.is_empty() && seq > from {
                return Ok(Err(seq));
            }
            if let Some(event) = fields.get(keys::EVENT).and_then(|json| decode(*id, seq, json)) {
                out.push(event);
            }
        }
        Ok(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_events_decode_to_what_was_logged() {
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let events = [
            StreamEvent::Start { stream_id: id, generator: "demo".into() },
            StreamEvent::Delta { stream_id: id, seq: 1, text: "👩‍👩‍👧".into() },
            StreamEvent::Done {
                stream_id: id,
                seq: 2,
                finish_reason: FinishReason::Stop,
                chars: 1,
                usage: Some(Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }),
            },
        ];
        for (seq, event) in events.iter().enumerate() {
            let json = encode(event).unwrap_or_default();
            assert_eq!(decode(id, seq as u64, &json).as_ref(), Some(event));
        }
        for code in ErrorCode::ALL {
            let event = StreamEvent::Error { stream_id: id, seq: 3, code, message: "m".into() };
            assert_eq!(decode(id, 3, &encode(&event).unwrap_or_default()), Some(event));
        }
        // A code this version does not know is still a terminal error.
        let unknown = decode(id, 3, r#"{"t":"e","c":"from_the_future","m":"m"}"#);
        assert!(matches!(unknown, Some(StreamEvent::Error { code: ErrorCode::Internal, .. })));
    }
}
