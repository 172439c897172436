//! Every Redis key, pub/sub channel and field name tokengate uses, in one
//! place. All keys are under the `tg:` prefix and carry TTLs:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `tg:s:{id}` | stream | a stream's events; entry id `0-{seq+1}`, field [`EVENT`] |
//! | `tg:m:{id}` | hash | the stream's [`OWNER`] and [`GENERATOR`] |
//! | `tg:l:{id}` | string | the producer's lease (replica alive) |
//! | `tg:r:{id}` | string | a reader on another replica follows the stream |
//! | `tg:c:{name}` | stream | a channel's events; fields [`DATA`] and [`EVENT_NAME`] |
//! | `tg:n:{name}` | hash | a channel's subscriber count per replica |
//! | [`CHANNELS_LIVE`] | sorted set | every channel a subject created, scored by when it expires unused (ms of Redis time) |
//! | [`CHANNELS_CREATOR`] | hash | each of those channels' creating subject |
//! | [`CHANNELS_CREATED`] | hash | per subject, how many of those channels it created |
//! | `tg:u:{len}:{owner}:{chat}` | string | a UI chat's current stream id (`len`: the owner's length in bytes) |
//! | `tg:lead:{role}` | string | the replica that holds a cluster-wide duty (the demo feeds), with a TTL |
//! | `tg:q:{len}:{subject}:{counter}` | string | a subject's use of one quota unit in one window (an integer) |
//! | `tg:rate:s:{subject}` | string | a subject's GCRA state: its theoretical arrival time, in µs of Redis time |
//! | `tg:rate:ip:{ip}` | string | a client IP's GCRA state, the same way |
//! | `tg:slots:{subject}` | sorted set | a subject's stream leases, scored by expiry (ms of Redis time) |
//! | `tg:t:{digest}` | hash | a stream ticket: [`TICKET_RECORD`], [`TICKET_USE`], [`TICKET_BINDING`] |
//! | [`CANCEL_CHANNEL`] | pub/sub | stream ids to cancel, heard by every replica |
//! | [`ATTACH_CHANNEL`] | pub/sub | stream ids a remote reader just attached to |

use crate::event::StreamId;

/// Prefix of stream log keys (also stripped from `XREAD` replies).
pub(super) const STREAM_PREFIX: &str = "tg:s:";
/// Prefix of channel log keys (also stripped from `XREAD` replies).
pub(super) const CHANNEL_PREFIX: &str = "tg:c:";
/// Pub/sub channel carrying cancels (`DELETE` on any replica).
pub(super) const CANCEL_CHANNEL: &str = "tg:cancel";
/// Pub/sub channel carrying remote readers' first announcements.
pub(super) const ATTACH_CHANNEL: &str = "tg:attach";

/// The channels subjects created, by name, scored by expiry: what the bounds on channel
/// creation count. Subjects and names are members and fields, never part of a key, so no
/// subject or name can spell another's key.
pub(super) const CHANNELS_LIVE: &str = "tg:chans";
/// Channel name to the subject that created it.
pub(super) const CHANNELS_CREATOR: &str = "tg:chans:by";
/// Subject to the number of live channels it created.
pub(super) const CHANNELS_CREATED: &str = "tg:chans:n";

/// Stream log entry field: the stored event (JSON).
pub(super) const EVENT: &str = "e";
/// Stream metadata field: the owning subject.
pub(super) const OWNER: &str = "owner";
/// Stream metadata field: the generator's name.
pub(super) const GENERATOR: &str = "generator";
/// Channel entry field: the published data (JSON text).
pub(super) const DATA: &str = "d";
/// Channel entry field: the published event name (absent for `message`).
pub(super) const EVENT_NAME: &str = "e";
/// Ticket field: what the ticket grants (set when it is issued).
pub(super) const TICKET_RECORD: &str = "r";
/// Ticket field: its first use (set by the one atomic take that wins).
pub(super) const TICKET_USE: &str = "u";
/// Ticket field: what its first use opened.
pub(super) const TICKET_BINDING: &str = "b";

/// A stream's event log.
pub(super) fn stream(id: &StreamId) -> String {
    format!("{STREAM_PREFIX}{id}")
}

/// The stream a log key names.
pub(super) fn stream_id_of(key: &str) -> Option<StreamId> {
    StreamId::parse(key.strip_prefix(STREAM_PREFIX)?)
}

/// A stream's owner and generator.
pub(super) fn meta(id: &StreamId) -> String {
    format!("tg:m:{id}")
}

/// A stream producer's lease.
pub(super) fn lease(id: &StreamId) -> String {
    format!("tg:l:{id}")
}

/// A remote reader's announcement for a stream.
pub(super) fn remote_reader(id: &StreamId) -> String {
    format!("tg:r:{id}")
}

/// A UI chat's current stream. The owner's length comes first, so that no
/// owner and chat id pair can spell another pair's key, whatever either
/// contains.
pub(super) fn chat(owner: &str, chat: &str) -> String {
    format!("tg:u:{}:{owner}:{chat}", owner.len())
}

/// The lease of the replica that holds a cluster-wide duty.
pub(super) fn leader(role: &str) -> String {
    format!("tg:lead:{role}")
}

/// A subject's quota counter (`counter` names the unit and window). The
/// subject's length comes first, as in [`chat`].
pub(super) fn quota(subject: &str, counter: &str) -> String {
    format!("tg:q:{}:{subject}:{counter}", subject.len())
}

/// A subject's request-rate state (GCRA). The subject is the key's only
/// variable part, so no two subjects share a key whatever they contain.
pub(super) fn rate_subject(subject: &str) -> String {
    format!("tg:rate:s:{subject}")
}

/// A client IP's request-rate state (GCRA).
pub(super) fn rate_ip(ip: &std::net::IpAddr) -> String {
    format!("tg:rate:ip:{ip}")
}

/// A subject's stream leases, cluster-wide.
pub(super) fn stream_slots(subject: &str) -> String {
    format!("tg:slots:{subject}")
}

/// A stream ticket, by the digest of the ticket (the ticket itself is
/// never stored, so a dump of Redis holds no usable ticket).
pub(super) fn ticket(digest: &str) -> String {
    format!("tg:t:{digest}")
}

/// A channel's event log.
pub(super) fn channel(name: &str) -> String {
    format!("{CHANNEL_PREFIX}{name}")
}

/// A channel's per-replica subscriber counts.
pub(super) fn subscribers(name: &str) -> String {
    format!("tg:n:{name}")
}

/// The entry id of sequence number `seq` in a stream log (`0-{seq+1}`:
/// Redis refuses `0-0`, and `XRANGE` by sequence number stays exact).
pub(super) fn entry_id(seq: u64) -> String {
    format!("0-{}", seq + 1)
}

/// The entry id just before sequence number `seq` (`0-0` for 0): `XREAD`
/// after it returns the entries from `seq` on.
pub(super) fn entry_id_before(seq: u64) -> String {
    format!("0-{seq}")
}

/// The sequence number of a stream log entry id.
pub(super) fn seq_of(entry_id: &str) -> Option<u64> {
    entry_id.strip_prefix("0-")?.parse::<u64>().ok()?.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_round_trip_sequence_numbers() {
        for seq in [0, 1, 41, u64::MAX - 1] {
            assert_eq!(seq_of(&entry_id(seq)), Some(seq));
        }
        assert_eq!(seq_of("0-0"), None);
        assert_eq!(entry_id_before(0), "0-0");
        assert_eq!(entry_id_before(7), entry_id(6));
        assert_eq!(seq_of("12-3"), None);
    }

    #[test]
    fn log_keys_name_their_stream() {
        let id = StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!());
        assert_eq!(stream_id_of(&stream(&id)), Some(id));
        assert_eq!(stream_id_of(&channel("0123456789abcdef0123456789abcdef")), None);
    }

    #[test]
    fn chat_keys_of_different_pairs_differ() {
        assert_ne!(chat("a:b", "c"), chat("a", "b:c"));
        assert_eq!(chat("alice", "c1"), "tg:u:5:alice:c1");
    }
}
