//! Stream logs in Redis: each stream's events as a Redis Stream, and its
//! owner and generator in a hash. An entry holds one event, or a run of up
//! to [`MAX_RUN`] consecutive deltas (one `XADD` per replicated batch rather
//! than one per grapheme cluster: the command count, not the bytes, is what
//! costs Redis and the replicas). An entry's id is `0-{seq+1}` of its last
//! event, so `XRANGE` from a sequence number starts at the entry that holds
//! it, and trimming by `MINID` keeps exactly the newest `stream_max_events`
//! sequence numbers (plus the rest of a run that straddles the cut).
//!
//! Only the producing replica's writer ([`Replication`](super::Replication)) writes a log, in
//! sequence order, so explicit entry ids always grow; readers on any replica read it with plain `XRANGE`
//! (no consumer groups: a reader's position is its own cursor, nothing is acknowledged).
//!
//! Trimming is exact (`MINID`, not `MINID ~`): with runs, a log has a few entries per hundred
//! events, and approximate trimming, which drops only whole internal nodes of 100 entries,
//! would keep several times `stream_max_events` in Redis. Exact trimming costs Redis about one
//! entry's deletion per append.
//!
//! Run entries (`"t":"c"`, and `"t":"r"` as an earlier build of this version wrote them, still
//! read) are this version's: a replica of an earlier version reads one as an undecodable entry,
//! so in a rolling upgrade its cross-replica readers see a gap. Upgrade the replicas that serve
//! readers first, or drain streams across the upgrade.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::super::keys;
use super::{Entries, LEASE, RedisStore};
use crate::event::{ErrorCode, FinishReason, StreamEvent, StreamId, Usage};
use crate::store::StoreError;

/// A stream's metadata as another replica reads it back. Only the owner is: it is all that
/// locating a stream decides (who may resume or cancel it); the generator's name reaches a
/// reader in the replayed `Start` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::store) struct RemoteMeta {
    /// Owning subject.
    pub(in crate::store) owner: String,
}

/// The stored form of a logged event (compact field names: one per char).
///
/// Neither the stream id nor the sequence number is stored: the key names the stream and the
/// entry id carries the (last) sequence number, and [`decode_entry`] puts both back. Renaming a
/// tag or field makes the entries that live replicas wrote unreadable (they would be skipped as
/// undecodable), so the names are part of the format shared by every replica of a rolling
/// upgrade. The texts are `Cow`s: an entry is written from the logged events' own strings,
/// without a copy per grapheme cluster.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t")]
enum Stored<'a> {
    /// `Start`: `g` is the generator's name.
    #[serde(rename = "s")]
    Start {
        #[serde(borrow)]
        g: Cow<'a, str>,
    },
    /// `Delta`: `x` is its one grapheme cluster.
    #[serde(rename = "d")]
    Delta {
        #[serde(borrow)]
        x: Cow<'a, str>,
    },
    /// `Done`: `n` is the number of deltas, `u` the usage if reported (absent otherwise, and
    /// absent reads as none). No finish reason is stored: `Stop` is the only one, and decoding
    /// restores it, so a new [`FinishReason`] needs a field here first.
    #[serde(rename = "f")]
    Done {
        n: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        u: Option<Usage>,
    },
    /// The code as its wire string: a code written by a newer replica that
    /// this one does not know reads as `internal`, not as a lost event.
    #[serde(rename = "e")]
    Error {
        #[serde(borrow)]
        c: Cow<'a, str>,
        #[serde(borrow)]
        m: Cow<'a, str>,
    },
    /// Consecutive deltas, `x` their clusters in order; the entry id is the
    /// last one's, so the first is `len - 1` before it. Never empty. Read
    /// only (an earlier build wrote runs so); [`Stored::Text`] is written.
    #[serde(rename = "r")]
    Run {
        #[serde(borrow)]
        x: Vec<Cow<'a, str>>,
    },
    /// Consecutive deltas as one text: `x` their clusters concatenated, `l`
    /// each cluster's length in bytes, absent when every cluster is one
    /// `char` (most text: ASCII, CJK), so an ASCII run costs Redis about a
    /// byte per character where a JSON array of strings cost four. The
    /// entry id is the last one's. Never empty.
    #[serde(rename = "c")]
    Text {
        #[serde(borrow)]
        x: Cow<'a, str>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        l: Option<Vec<u32>>,
    },
}

impl Stored<'_> {
    /// A run of clusters (at least two) as a [`Stored::Text`].
    fn text_run(clusters: &[Cow<'_, str>]) -> Stored<'static> {
        let text: String = clusters.concat();
        let single = clusters.iter().all(|c| c.chars().nth(1).is_none());
        let lengths = (!single).then(|| clusters.iter().map(|c| c.len() as u32).collect());
        Stored::Text { x: Cow::Owned(text), l: lengths }
    }

    /// The clusters of a [`Stored::Text`], in order; `None` for lengths that
    /// do not cut the text at character boundaries into non-empty clusters
    /// that cover it (a corrupt entry).
    fn text_clusters(text: &str, lengths: Option<&[u32]>) -> Option<Vec<String>> {
        let Some(lengths) = lengths else {
            return Some(text.chars().map(String::from).collect());
        };
        let mut clusters = Vec::with_capacity(lengths.len());
        let mut at = 0usize;
        for &len in lengths {
            let end = at.checked_add(usize::try_from(len).ok().filter(|&l| l > 0)?)?;
            clusters.push(text.get(at..end)?.to_owned());
            at = end;
        }
        (at == text.len()).then_some(clusters)
    }
}

/// Most deltas in one run entry: bounds what a read from inside a run
/// fetches before its position, and how far past `stream_max_events`
/// trimming may keep.
pub(super) const MAX_RUN: usize = 64;

/// A batch of events as log entries: `(entry's last sequence number, JSON)`,
/// consecutive deltas grouped into runs of at most [`MAX_RUN`], every other
/// event an entry of its own. Unlogged events are left out.
fn encode_entries(events: &[Arc<StreamEvent>]) -> Vec<(u64, String)> {
    fn flush<'a>(run: &mut Vec<Cow<'a, str>>, last: u64, out: &mut Vec<(u64, String)>) {
        let stored = match run.len() {
            0 => return,
            1 => Stored::Delta { x: run.remove(0) },
            _ => Stored::text_run(run),
        };
        if let Ok(json) = serde_json::to_string(&stored) {
            out.push((last, json));
        }
        run.clear();
    }
    let mut out = Vec::new();
    let mut run: Vec<Cow<'_, str>> = Vec::new();
    let mut last = 0;
    for event in events {
        let Some(seq) = event.seq() else { continue };
        match &**event {
            StreamEvent::Delta { text, .. } => {
                if !run.is_empty() && (seq != last + 1 || run.len() == MAX_RUN) {
                    flush(&mut run, last, &mut out);
                }
                run.push(Cow::Borrowed(text));
                last = seq;
            }
            other => {
                flush(&mut run, last, &mut out);
                if let Some(json) = encode(other) {
                    out.push((seq, json));
                }
            }
        }
    }
    flush(&mut run, last, &mut out);
    out
}

/// The JSON an event is logged as; `None` for the events that belong to one connection rather
/// than to the stream (`Shutdown`, `Heartbeat`), which are never logged, and, in principle, for a
/// serialization failure. [`RedisStore::append_commands`] skips what this refuses.
fn encode(event: &StreamEvent) -> Option<String> {
    let stored = match event {
        StreamEvent::Start { generator, .. } => Stored::Start { g: Cow::Borrowed(generator) },
        StreamEvent::Delta { text, .. } => Stored::Delta { x: Cow::Borrowed(text) },
        StreamEvent::Done { chars, usage, .. } => Stored::Done { n: *chars, u: *usage },
        StreamEvent::Error { code, message, .. } => {
            Stored::Error { c: Cow::Borrowed(code.as_str()), m: Cow::Borrowed(message) }
        }
        StreamEvent::Shutdown { .. } | StreamEvent::Heartbeat => return None,
    };
    serde_json::to_string(&stored).ok()
}

/// The events of the entry whose last event is `last`, in order; `None` for
/// JSON this version cannot read, or a run that would start before
/// sequence number 1 (a corrupt entry).
pub(super) fn decode_entry(stream_id: StreamId, last: u64, json: &str) -> Option<Vec<StreamEvent>> {
    let clusters: Vec<String> = match serde_json::from_str::<Stored>(json).ok()? {
        Stored::Run { x } => x.into_iter().map(Cow::into_owned).collect(),
        Stored::Text { x, l } => Stored::text_clusters(&x, l.as_deref())?,
        single => return Some(vec![from_stored(stream_id, last, single)?]),
    };
    let first = (last + 1).checked_sub(clusters.len() as u64).filter(|&f| f >= 1 && !clusters.is_empty())?;
    let deltas = clusters.into_iter().zip(first..);
    Some(deltas.map(|(text, seq)| StreamEvent::Delta { stream_id, seq, text: text.into() }).collect())
}

/// One stored event as the event it was: `stream_id` from the key and `seq` from the entry id
/// (a `Start` is always sequence 0). `None` for a run (see [`decode_entry`]).
fn from_stored(stream_id: StreamId, seq: u64, stored: Stored<'_>) -> Option<StreamEvent> {
    Some(match stored {
        Stored::Start { g } => StreamEvent::Start { stream_id, generator: g.into_owned() },
        Stored::Delta { x } => StreamEvent::Delta { stream_id, seq, text: x.as_ref().into() },
        Stored::Done { n, u } => {
            StreamEvent::Done { stream_id, seq, finish_reason: FinishReason::Stop, chars: n, usage: u }
        }
        Stored::Error { c, m } => {
            let code = ErrorCode::parse(&c).unwrap_or(ErrorCode::Internal);
            StreamEvent::Error { stream_id, seq, code, message: m.into_owned() }
        }
        Stored::Run { .. } | Stored::Text { .. } => return None,
    })
}

impl RedisStore {
    /// The last logged event's sequence number and whether it is terminal; `None` for a log that
    /// does not exist (yet: the key appears with the first replicated event) or whose newest
    /// entry does not decode. `Store::cursor` uses it to answer a resume of a finished stream
    /// that the client has fully seen without opening a cursor.
    pub(in crate::store) async fn last_event(&self, id: &StreamId) -> Result<Option<(u64, bool)>, StoreError> {
        Ok(self.newest(&keys::stream(id)).await?.and_then(|(entry_id, fields)| {
            let seq = keys::seq_of(&entry_id)?;
            let events = fields.get(keys::EVENT).and_then(|json| decode_entry(*id, seq, json))?;
            Some((seq, events.last()?.is_terminal()))
        }))
    }

    /// Records a new stream and takes its lease, in one `MULTI`: a replica that finds the
    /// metadata also finds the lease, so a stream that has not logged anything yet is not taken
    /// for one whose producer died. The metadata gets the running TTL; the log key does not exist
    /// until the first append.
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

    /// Adds to `pipe` the commands that append events (consecutive, in order) to a stream's
    /// log, with runs of deltas as single entries ([`MAX_RUN`]); returns how many replies they
    /// get. The replica's writer ([`super::Replication`]) sends many streams' appends in one
    /// pipeline.
    ///
    /// The entry ids are given explicitly, so the order is the caller's duty: Redis refuses an
    /// id not above the log's newest one. The `first` append (which creates the log key) gives
    /// it the running TTL, which the lease refresh then renews every second, so later appends
    /// while the stream runs are its `XADD`s alone. Once a terminal event is in the batch, log
    /// and metadata get the finished TTL and the lease is deleted, all in one `MULTI`.
    pub(super) fn append_commands(
        &self,
        pipe: &mut redis::Pipeline,
        id: &StreamId,
        events: &[Arc<StreamEvent>],
        first: bool,
    ) -> usize {
        let key = keys::stream(id);
        let finished = events.iter().any(|e| e.is_terminal());
        let mut replies = 0;
        if finished {
            // Atomic: the terminal event and the lease's removal are seen
            // together, so a reader never mistakes a finished stream for a
            // lost one. Earlier batches need no transaction: their XADDs
            // are in order, and a failure stops the stream. (MULTI and EXEC
            // as commands of their own: the pipeline carries other streams'
            // appends too.)
            pipe.cmd("MULTI");
            replies += 1;
        }
        let keep = self.settings.stream_max_events as u64;
        for (last, json) in encode_entries(events) {
            let cmd = pipe.cmd("XADD").arg(&key);
            if last >= keep {
                // The newest `keep` sequence numbers stay (entry ids are by
                // sequence number).
                cmd.arg("MINID").arg(keys::entry_id(last + 1 - keep));
            }
            cmd.arg(keys::entry_id(last)).arg(keys::EVENT).arg(json);
            replies += 1;
        }
        let ttl = self.settings.stream_ttl_secs();
        if finished {
            // Finished: resumable for the TTL, no lease needed any more.
            pipe.expire(&key, ttl).expire(keys::meta(id), ttl).del(keys::lease(id)).cmd("EXEC");
            replies += 4;
        } else if first {
            pipe.expire(&key, self.settings.running_ttl_secs());
            replies += 1;
        }
        replies
    }

    /// The stream's owner, if Redis still holds the stream. Both metadata fields must be there
    /// (they are only ever written together); a hash without them counts as no stream.
    pub(in crate::store) async fn meta(&self, id: &StreamId) -> Result<Option<RemoteMeta>, StoreError> {
        let map: HashMap<String, String> = self.conn().hgetall(keys::meta(id)).await?;
        Ok(match (map.get(keys::OWNER), map.get(keys::GENERATOR)) {
            (Some(owner), Some(_)) => Some(RemoteMeta { owner: owner.clone() }),
            _ => None,
        })
    }

    /// Events from `from` on (up to `count`); `Err(first)` when `from` was
    /// trimmed away.
    ///
    /// A trimmed position shows as a first entry above `from`; `Err` then carries that entry's
    /// sequence number, the oldest kept. An empty result only says that nothing is at `from`
    /// yet: whether more can come is for the lease to say ([`RedisStore::leased`]). An entry
    /// that does not decode is left out of the result; if it is the one at `from` and more
    /// follow, the read reports a gap at the next one.
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
            let Some(last) = keys::seq_of(&entry_id) else { continue };
            let events = fields.get(keys::EVENT).and_then(|json| decode_entry(*id, last, json));
            // The first entry must hold `from` (an undecodable one counts
            // as starting at its id).
            let first = events.as_ref().and_then(|e| e.first()).map_or(last, |e| e.seq().unwrap_or(0));
            if out.is_empty() && first > from {
                return Ok(Err(first));
            }
            out.extend(events.into_iter().flatten().filter(|e| e.seq().unwrap_or(0) >= from));
            if out.len() >= count {
                out.truncate(count);
                break;
            }
        }
        Ok(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_deltas_are_stored_as_runs_and_read_back_one_by_one() {
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let delta = |seq: u64| Arc::new(StreamEvent::Delta { stream_id: id, seq, text: format!("c{seq}").into() });
        let mut events = vec![Arc::new(StreamEvent::Start { stream_id: id, generator: "g".into() })];
        events.extend((1..=70).map(delta));
        events.push(Arc::new(StreamEvent::Heartbeat));
        events.push(Arc::new(StreamEvent::Done {
            stream_id: id,
            seq: 71,
            finish_reason: FinishReason::Stop,
            chars: 70,
            usage: None,
        }));
        let entries = encode_entries(&events);
        // Start, a full run, the rest of the deltas, done; no heartbeat.
        let ids: Vec<u64> = entries.iter().map(|(last, _)| *last).collect();
        assert_eq!(ids, [0, MAX_RUN as u64, 70, 71]);
        // A run is its text and, as these clusters are longer than one
        // char, their lengths.
        assert_eq!(entries[2].1, r#"{"t":"c","x":"c65c66c67c68c69c70","l":[3,3,3,3,3,3]}"#);
        let decoded: Vec<StreamEvent> =
            entries.iter().flat_map(|(last, json)| decode_entry(id, *last, json).unwrap_or_default()).collect();
        let logged: Vec<StreamEvent> = events.iter().filter(|e| e.seq().is_some()).map(|e| (**e).clone()).collect();
        assert_eq!(decoded, logged);
        // A lone delta is stored as before runs existed; a hole in the
        // sequence numbers starts a new entry.
        let entries = encode_entries(&[delta(5), delta(6), delta(9)]);
        assert_eq!(entries.iter().map(|(last, _)| *last).collect::<Vec<_>>(), [6, 9]);
        assert_eq!(entries[1].1, r#"{"t":"d","x":"c9"}"#);
        // A run that would start before sequence number 1 is corrupt.
        assert_eq!(decode_entry(id, 1, r#"{"t":"r","x":["a","b"]}"#), None);
        assert_eq!(decode_entry(id, 2, r#"{"t":"r","x":[]}"#), None);
        assert_eq!(decode_entry(id, 1, r#"{"t":"c","x":"ab"}"#), None);
        assert_eq!(decode_entry(id, 5, r#"{"t":"c","x":""}"#), None);
    }

    #[test]
    fn a_run_of_one_char_clusters_is_its_text_alone_and_any_other_run_carries_lengths() {
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let run = |texts: &[&str]| -> Vec<Arc<StreamEvent>> {
            let deltas = texts.iter().zip(1..);
            deltas.map(|(t, seq)| Arc::new(StreamEvent::Delta { stream_id: id, seq, text: (*t).into() })).collect()
        };
        let decoded = |last: u64, json: &str| -> Vec<String> {
            let events = decode_entry(id, last, json).unwrap_or_default();
            events
                .into_iter()
                .map(|e| if let StreamEvent::Delta { text, .. } = e { text.to_string() } else { String::new() })
                .collect()
        };
        let plain = ["a", "你", "好", "\"", "😀"];
        let entries = encode_entries(&run(&plain));
        assert_eq!(entries, [(5, r#"{"t":"c","x":"a你好\"😀"}"#.to_owned())]);
        assert_eq!(decoded(5, &entries[0].1), plain);
        let mixed = ["👩‍👩‍👧", "e\u{301}", "x", "\r\n"];
        let entries = encode_entries(&run(&mixed));
        assert_eq!(entries, [(4, r#"{"t":"c","x":"👩‍👩‍👧éx\r\n","l":[18,3,1,2]}"#.to_owned())]);
        assert_eq!(decoded(4, &entries[0].1), mixed);
        // What an earlier build wrote still reads.
        assert_eq!(decoded(2, r#"{"t":"r","x":["a","b"]}"#), ["a", "b"]);
        // Lengths that do not cover the text, cut inside a char, or are zero: corrupt.
        for json in [
            r#"{"t":"c","x":"abc","l":[1,1]}"#,
            r#"{"t":"c","x":"abc","l":[1,1,2]}"#,
            r#"{"t":"c","x":"你好","l":[1,5]}"#,
            r#"{"t":"c","x":"ab","l":[0,2]}"#,
        ] {
            assert_eq!(decode_entry(id, 9, json), None, "{json}");
        }
    }

    #[test]
    fn stored_events_decode_to_what_was_logged() {
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        let events = [
            StreamEvent::Start { stream_id: id, generator: "demo".into() },
            StreamEvent::Delta { stream_id: id, seq: 1, text: "👩‍👩‍👧".into() },
            // Escaped in JSON: decoded into an owned string, not borrowed.
            StreamEvent::Delta { stream_id: id, seq: 2, text: "\"\r\n\\".into() },
            StreamEvent::Done {
                stream_id: id,
                seq: 3,
                finish_reason: FinishReason::Stop,
                chars: 2,
                usage: Some(Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }),
            },
        ];
        for (seq, event) in events.iter().enumerate() {
            let json = encode(event).unwrap_or_default();
            assert_eq!(decode_entry(id, seq as u64, &json).as_deref(), Some(std::slice::from_ref(event)));
        }
        for code in ErrorCode::ALL {
            let event = StreamEvent::Error { stream_id: id, seq: 3, code, message: "m".into() };
            assert_eq!(decode_entry(id, 3, &encode(&event).unwrap_or_default()), Some(vec![event]));
        }
        // A code this version does not know is still a terminal error.
        let unknown = decode_entry(id, 3, r#"{"t":"e","c":"from_the_future","m":"m"}"#);
        assert!(matches!(unknown.as_deref(), Some([StreamEvent::Error { code: ErrorCode::Internal, .. }])));
    }
}
