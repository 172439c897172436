//! Tallies of the verdicts, and the one summary line the run prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::verify::{Note, Verdict};

/// A judged stream: its verdict, what it lived through, and for a failure
/// the transcript in short (for the report on stderr).
#[derive(Debug)]
pub struct Judged {
    /// The verdict.
    pub verdict: Verdict,
    /// What a resume from its terminal id showed, when chaos explains it.
    pub note: Option<Note>,
    /// Redis was restarted while it ran.
    pub redis_chaos: bool,
    /// Connections it took (1 + resumes).
    pub connections: u32,
    /// For failures: who, what and the events, for reproduction.
    pub detail: Option<String>,
}

/// Counts over a set of streams.
#[derive(Debug, Default)]
pub struct Tally {
    /// Streams judged.
    pub streams: u64,
    /// Exact text and `done`.
    pub ok: u64,
    /// Documented errors by code.
    pub documented: BTreeMap<String, u64>,
    /// Lost text.
    pub lost: u64,
    /// Duplicated events.
    pub duplicated: u64,
    /// No end within the deadline.
    pub hung: u64,
    /// Other failures.
    pub unexpected: u64,
    /// Ends that were not final (a resume from the terminal id on the
    /// other replica answered 200 with more).
    pub not_final: u64,
    /// Explained non-final ends, by kind and code.
    pub notes: BTreeMap<String, u64>,
    /// Outcomes (`ok` or the code) of the streams a Redis restart touched:
    /// what a restart without persistence costs the streams open then.
    pub redis_touched: BTreeMap<String, u64>,
    /// Most connections one stream took.
    pub max_connections: u32,
    /// The first failures, in full.
    pub failures: Vec<String>,
}

impl Tally {
    /// Adds one judged stream.
    pub fn add(&mut self, j: Judged) {
        self.streams += 1;
        self.max_connections = self.max_connections.max(j.connections);
        let label = match &j.verdict {
            Verdict::Ok => {
                self.ok += 1;
                "ok".to_owned()
            }
            Verdict::Documented(code) => {
                *self.documented.entry(code.clone()).or_default() += 1;
                code.clone()
            }
            Verdict::Lost(_) => {
                self.lost += 1;
                "LOST".to_owned()
            }
            Verdict::Duplicated(_) => {
                self.duplicated += 1;
                "DUPLICATED".to_owned()
            }
            Verdict::Hung => {
                self.hung += 1;
                "HUNG".to_owned()
            }
            Verdict::Unexpected(_) => {
                self.unexpected += 1;
                "UNEXPECTED".to_owned()
            }
            Verdict::NotFinal(_) => {
                self.not_final += 1;
                "NOT_FINAL".to_owned()
            }
        };
        if let Some(note) = j.note {
            let key = match note {
                Note::Repeated(code) => format!("{code} repeated"),
                Note::Diverged(code) => format!("{code} then more elsewhere"),
            };
            *self.notes.entry(key).or_default() += 1;
        }
        if j.redis_chaos {
            *self.redis_touched.entry(label).or_default() += 1;
        }
        if let Some(d) = j.detail
            && self.failures.len() < 20
        {
            self.failures.push(d);
        }
    }

    /// Merges another tally in.
    pub fn merge(&mut self, o: Tally) {
        self.streams += o.streams;
        self.ok += o.ok;
        for (k, v) in o.documented {
            *self.documented.entry(k).or_default() += v;
        }
        for (k, v) in o.redis_touched {
            *self.redis_touched.entry(k).or_default() += v;
        }
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.hung += o.hung;
        self.unexpected += o.unexpected;
        self.not_final += o.not_final;
        for (k, v) in o.notes {
            *self.notes.entry(k).or_default() += v;
        }
        self.max_connections = self.max_connections.max(o.max_connections);
        for f in o.failures {
            if self.failures.len() < 20 {
                self.failures.push(f);
            }
        }
    }

    /// Any stream failed.
    pub fn failed(&self) -> bool {
        self.lost + self.duplicated + self.hung + self.unexpected + self.not_final > 0
    }

    /// One line of counts, for a round.
    pub fn brief(&self) -> String {
        format!(
            "{} streams: {} ok, documented [{}], {} lost, {} duplicated, {} hung, {} unexpected, {} not final; notes [{}]",
            self.streams,
            self.ok,
            self.documented_list(),
            self.lost,
            self.duplicated,
            self.hung,
            self.unexpected,
            self.not_final,
            list(&self.notes)
        )
    }

    /// `cancelled 40, generator_lost 12`.
    pub fn documented_list(&self) -> String {
        list(&self.documented)
    }
}

/// `k v, k v` of a map.
pub fn list(m: &BTreeMap<String, u64>) -> String {
    let mut s = String::new();
    for (k, v) in m {
        if !s.is_empty() {
            s.push_str(", ");
        }
        let _ = write!(s, "{k} {v}");
    }
    s
}

/// `+2.1%` from two RSS readings.
pub fn growth(before: u64, after: u64) -> f64 {
    if before == 0 { 0.0 } else { (after as f64 - before as f64) * 100.0 / before as f64 }
}
