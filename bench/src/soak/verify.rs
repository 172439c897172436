//! The verdict on one stream: it delivered its exact text (every cluster
//! once, in order, ids contiguous, one terminal event, nothing after it),
//! or a contiguous prefix of it and then a terminal error that the chaos
//! it lived through explains. Anything else is lost, duplicated, hung or
//! unexpected, and fails the soak.

use super::client::{End, Final, Kind, Transcript};

/// What became of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The exact text and `done`.
    Ok,
    /// A contiguous prefix and a documented error its chaos explains
    /// (`stream_not_found` stands for a resume answered 404 after Redis
    /// lost the stream; `no_start` for a connection that died with its
    /// replica before the `start` event named the stream).
    Documented(String),
    /// A gap, wrong text, or a missing tail.
    Lost(String),
    /// An event or a cluster delivered twice, or anything after the end.
    Duplicated(String),
    /// No terminal event within the deadline.
    Hung,
    /// Some other failure (an unexplained error code, a refusal, bad HTTP).
    Unexpected(String),
    /// The text and the end were right, but the end was not final: a
    /// resume from the terminal event's id, on the other replica, did not
    /// answer 204 and no chaos explains it (README, "Resume": a stream
    /// whose events were all delivered answers 204).
    NotFinal(String),
}

/// What a resume from the terminal id showed, when the chaos explains it
/// (counted, not failed): the documented limits of the shared mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The same synthesized error again (a reader elsewhere reports the
    /// lost producer or the Redis outage anew on every resume).
    Repeated(String),
    /// The producer's log went on past the error a reader elsewhere
    /// reported (`store_unavailable` during the Redis restart: the
    /// reader's error took a sequence number the producer used for a
    /// delta).
    Diverged(String),
}

impl Verdict {
    /// Whether this verdict fails the soak.
    pub fn failed(&self) -> bool {
        !matches!(self, Verdict::Ok | Verdict::Documented(_))
    }
}

/// Error codes a stream may end with given what happened while it ran.
fn explained(t: &Transcript, code: &str) -> bool {
    match code {
        "cancelled" => t.cancel_sent,
        // With Redis, also what a reader elsewhere sees when the producer's
        // terminal event could not be written during an outage.
        "generator_lost" => t.replica_chaos || t.redis_chaos,
        "store_unavailable" | "resume_gap" => t.redis_chaos,
        _ => false,
    }
}

/// Judges one transcript: its verdict, and a note when a resume from its
/// terminal id showed something the chaos explains.
pub fn verdict(t: &Transcript) -> (Verdict, Option<Note>) {
    let v = judge(t);
    if v.failed() {
        return (v, None);
    }
    let Final::Replayed(events) = &t.final_resume else { return (v, None) };
    let terminal = t.log.events.last().map(|s| (s.seq, s.kind.clone()));
    let code = match &terminal {
        Some((_, Kind::Error(code))) => Some(code.clone()),
        _ => None,
    };
    // Only a documented error end the chaos explains may look different
    // from the other replica; a `done` (or a cancel) must be final.
    match (code, matches!(v, Verdict::Documented(_)) && (t.replica_chaos || t.redis_chaos)) {
        (Some(code), true) if code != "cancelled" => {
            // The same error again (at the same position, or synthesized
            // anew one position later) is a repeat; anything else diverged.
            let same = terminal.as_ref().map(|(_, k)| k);
            let note = if events.len() == 1 && events.first().map(|(_, k)| k) == same {
                Note::Repeated(code)
            } else {
                Note::Diverged(code)
            };
            (v, Some(note))
        }
        _ => (v, None),
    }
}

fn judge(t: &Transcript) -> Verdict {
    if let Some(v) = sequence(t) {
        return v;
    }
    if let Some(first) = t.log.after_terminal.first() {
        return Verdict::Duplicated(format!(
            "{} event(s) after the terminal one, first {:?}",
            t.log.after_terminal.len(),
            first.kind
        ));
    }
    let n = t.expected.clusters.len();
    let end = match &t.end {
        End::Terminal => match t.log.events.last().map(|s| &s.kind) {
            Some(Kind::Done(chars)) if t.log.deltas == n && *chars == Some(n as u64) => Verdict::Ok,
            Some(Kind::Done(chars)) => {
                Verdict::Lost(format!("done (chars {chars:?}) after {} of {n} clusters", t.log.deltas))
            }
            Some(Kind::Error(code)) if explained(t, code) => Verdict::Documented(code.clone()),
            Some(Kind::Error(code)) => {
                Verdict::Unexpected(format!("error {code} after {} of {n} clusters{}", t.log.deltas, chaos(t)))
            }
            other => Verdict::Unexpected(format!("ended on {other:?}")),
        },
        End::NotFound if t.redis_chaos => Verdict::Documented("stream_not_found".into()),
        End::NotFound => {
            Verdict::Lost(format!("resume answered 404 after {} of {n} clusters{}", t.log.deltas, chaos(t)))
        }
        End::NoContent => {
            Verdict::Lost(format!("resume answered 204 after {} of {n} clusters, no terminal event", t.log.deltas))
        }
        End::Hung => Verdict::Hung,
        End::NoStart if t.replica_chaos => Verdict::Documented("no_start".into()),
        other => Verdict::Unexpected(format!("{other:?}{}", chaos(t))),
    };
    if end.failed() {
        return end;
    }
    match &t.final_resume {
        Final::NoContent | Final::NotTried => end,
        Final::NotFound if t.redis_chaos => end,
        Final::Replayed(events) => match end {
            Verdict::Documented(ref code) if code != "cancelled" && (t.replica_chaos || t.redis_chaos) => end,
            _ => Verdict::NotFinal(format!(
                "a resume from the terminal id {:?} answered 200 with {events:?}{}",
                t.log.last_id,
                chaos(t)
            )),
        },
        other => Verdict::Unexpected(format!("a resume from the terminal id answered {other:?}{}", chaos(t))),
    }
}

fn chaos(t: &Transcript) -> String {
    let mut s = String::new();
    if t.replica_chaos {
        s.push_str(" (replica chaos)");
    }
    if t.redis_chaos {
        s.push_str(" (redis chaos)");
    }
    if t.cancel_sent {
        s.push_str(" (cancel sent)");
    }
    s
}

/// Ids contiguous from `start` (0) on, each delta exactly the next cluster.
fn sequence(t: &Transcript) -> Option<Verdict> {
    let mut next = 0u64;
    let mut delta = 0usize;
    for (i, s) in t.log.events.iter().enumerate() {
        if s.kind == Kind::Shutdown {
            continue;
        }
        if i == 0 && !matches!(s.kind, Kind::Start(_)) {
            return Some(Verdict::Unexpected(format!("first event {:?}", s.kind)));
        }
        if let Kind::Other(o) = &s.kind {
            return Some(Verdict::Unexpected(format!("unknown event {o}")));
        }
        match s.seq {
            // `resume_gap` is the one event whose id is not a position.
            None if s.kind == Kind::Error("resume_gap".into()) => {}
            None => return Some(Verdict::Unexpected(format!("event {:?} without a position id", s.kind))),
            Some(q) if q < next => {
                return Some(Verdict::Duplicated(format!("seq {q} again on connection {} (expected {next})", s.conn)));
            }
            Some(q) if q > next => {
                return Some(Verdict::Lost(format!(
                    "gap: seq {next} to {} missing before connection {}",
                    q - 1,
                    s.conn
                )));
            }
            Some(_) => next += 1,
        }
        if let Kind::Delta(text) = &s.kind {
            match t.expected.clusters.get(delta) {
                Some(want) if want == text => {}
                Some(want) => {
                    return Some(Verdict::Lost(format!(
                        "delta {delta} is {text:?}, expected {want:?} (connection {})",
                        s.conn
                    )));
                }
                None => return Some(Verdict::Duplicated(format!("delta {delta} {text:?} beyond the text's end"))),
            }
            delta += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::client::{Log, Seen};
    use crate::soak::text::Expected;

    fn transcript(kinds: &[(u64, Kind)], end: End) -> Transcript {
        let events: Vec<Seen> = kinds.iter().map(|(q, k)| Seen { conn: 0, seq: Some(*q), kind: k.clone() }).collect();
        let deltas = events.iter().filter(|s| matches!(s.kind, Kind::Delta(_))).count();
        Transcript {
            client: 0,
            n: 0,
            expected: Expected { prompt: "a你".into(), clusters: vec!["a".into(), "你".into()] },
            log: Log { events, deltas, terminal: end == End::Terminal, ..Log::default() },
            end,
            cancel_sent: false,
            replica_chaos: false,
            redis_chaos: false,
            final_resume: Final::NoContent,
            connections: 1,
        }
    }

    fn d(t: &str) -> Kind {
        Kind::Delta(t.into())
    }

    #[test]
    fn exact_text_passes_and_each_fault_is_named() {
        let start = (0, Kind::Start("s".into()));
        let ok = transcript(&[start.clone(), (1, d("a")), (2, d("你")), (3, Kind::Done(Some(2)))], End::Terminal);
        assert_eq!(judge(&ok), Verdict::Ok);
        let dup = transcript(&[start.clone(), (1, d("a")), (1, d("a")), (2, d("你"))], End::Terminal);
        assert!(matches!(judge(&dup), Verdict::Duplicated(_)));
        let gap = transcript(&[start.clone(), (2, d("你")), (3, Kind::Done(Some(2)))], End::Terminal);
        assert!(matches!(judge(&gap), Verdict::Lost(_)));
        let short = transcript(&[start.clone(), (1, d("a")), (2, Kind::Done(Some(1)))], End::Terminal);
        assert!(matches!(judge(&short), Verdict::Lost(_)));
        let lost = transcript(&[start.clone(), (1, d("a")), (2, Kind::Error("generator_lost".into()))], End::Terminal);
        assert!(matches!(judge(&lost), Verdict::Unexpected(_)), "no chaos explains it");
        let mut killed = lost;
        killed.replica_chaos = true;
        assert_eq!(judge(&killed), Verdict::Documented("generator_lost".into()));
        let wrong = transcript(&[start.clone(), (1, d("b"))], End::Hung);
        assert!(matches!(judge(&wrong), Verdict::Lost(_)));
        // `done`, then `generator_lost` from the other replica: not final.
        let mut again = transcript(&[start, (1, d("a")), (2, d("你")), (3, Kind::Done(Some(2)))], End::Terminal);
        again.final_resume = Final::Replayed(vec![(Some(4), Kind::Error("generator_lost".into()))]);
        assert!(matches!(verdict(&again), (Verdict::NotFinal(_), None)));
        again.replica_chaos = true;
        assert!(matches!(verdict(&again), (Verdict::NotFinal(_), None)), "a done must be final, chaos or not");
    }
}
