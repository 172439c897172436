//! What a subject may use: budgets per unit (characters delivered, model
//! tokens reported) per fixed window (a calendar minute, hour or day in
//! UTC, so that every replica agrees on when a window resets), and which
//! plan applies to whom (a class claim such as `tier`, then a scope, then
//! the default).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Principal, Scope};
use crate::store::QuotaCounter;

/// A window's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Window {
    /// 60 s.
    Minute,
    /// 3,600 s.
    Hour,
    /// 86,400 s.
    Day,
}

impl Window {
    /// The window's length in seconds.
    pub const fn secs(self) -> u64 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }

    /// Its name in settings and in `/v1/usage`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    /// The Unix second at which the window containing `now` ends.
    pub const fn resets_at(self, now: u64) -> u64 {
        (now / self.secs() + 1) * self.secs()
    }
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Characters (grapheme clusters) delivered, counted as they are.
    Chars,
    /// Model tokens, counted when the generator reports them.
    Tokens,
}

impl Unit {
    /// Its name in `/v1/usage` and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::Chars => "chars",
            Unit::Tokens => "tokens",
        }
    }
}

/// One budget: at most `max` of `unit` per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The window.
    pub window: Window,
    /// The unit.
    pub unit: Unit,
    /// The budget.
    pub max: u64,
}

impl Limit {
    /// The counter this budget is checked against for the window holding
    /// `now`. Its name holds the unit and the window, not the plan, so a
    /// subject moved to another plan mid-window keeps what it has used.
    pub fn counter(&self, now: u64) -> QuotaCounter {
        let len = self.window.secs();
        let unit = match self.unit {
            Unit::Chars => 'c',
            Unit::Tokens => 't',
        };
        QuotaCounter {
            name: format!("{unit}{len}:{}", now / len),
            limit: self.max,
            // One second past the end, so a counter read in its last second
            // is never a fresh one.
            ttl: Duration::from_secs(self.window.resets_at(now) - now + 1),
        }
    }
}

/// The budgets that apply to one subject, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `default`, `scope:NAME` or `class:VALUE`, as `/v1/usage` reports it.
    pub name: String,
    /// Never two for the same unit and window.
    pub limits: Vec<Limit>,
}

/// One plan's budgets as written in the file; every key optional, a plan
/// with none is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSettings {
    /// Characters per calendar minute.
    pub chars_per_minute: Option<u64>,
    /// Characters per hour.
    pub chars_per_hour: Option<u64>,
    /// Characters per day (UTC).
    pub chars_per_day: Option<u64>,
    /// Model tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Model tokens per hour.
    pub tokens_per_hour: Option<u64>,
    /// Model tokens per day (UTC).
    pub tokens_per_day: Option<u64>,
}

/// The `[quota]` table of the config file.
///
/// ```toml
/// [quota]
/// claim = "tier"            # optional: the claim that picks a class
/// reservation = 64          # characters reserved at a time per stream
/// [quota.default]
/// chars_per_hour = 200000
/// [quota.classes.pro]
/// chars_per_hour = 2000000
/// tokens_per_day = 5000000
/// [quota.scopes.admin]      # an empty plan: unlimited
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// The claim whose value selects a plan in `classes`.
    pub claim: Option<String>,
    /// Characters a stream reserves from the shared budget at a time.
    pub reservation: Option<u64>,
    /// The plan of subjects no override matches.
    #[serde(default)]
    pub default: PlanSettings,
    /// Plans by scope name (`stream`, `publish`, `admin`).
    #[serde(default)]
    pub scopes: BTreeMap<String, PlanSettings>,
    /// Plans by the value of the class claim.
    #[serde(default)]
    pub classes: BTreeMap<String, PlanSettings>,
}

/// Why the `[quota]` table cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A budget of zero: it would refuse every stream, which is better said
    /// by not granting the scope.
    #[error("`{0}` must be at least 1 (leave it out for no limit)")]
    Zero(String),
    /// A scope override that names no scope.
    #[error("unknown scope `{0}` in [quota.scopes] (use stream, publish or admin)")]
    UnknownScope(String),
    /// Classes without a claim to read them from.
    #[error("[quota.classes] needs `claim` (the token claim that names the class)")]
    NoClaim,
    /// A reservation of zero.
    #[error("`reservation` must be at least 1")]
    ZeroReservation,
}

/// Characters a stream reserves at a time unless configured: small enough
/// that a subject's streams, ended at once when its budget runs out, leave
/// little of it reserved and unused; large enough that with Redis a paced
/// stream makes one call per 64 characters.
pub const DEFAULT_RESERVATION: u64 = 64;

/// The validated plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanBook {
    default: Plan,
    /// In [`Scope::ALL`] order, so the first match is deterministic.
    scopes: Vec<(Scope, Plan)>,
    classes: BTreeMap<String, Plan>,
    /// See [`QuotaSettings::reservation`].
    pub reservation: u64,
    /// See [`QuotaSettings::claim`].
    pub claim: Option<String>,
}

impl PlanBook {
    /// Checks the settings. `None` when no plan has a budget: quotas are off.
    pub fn new(settings: &QuotaSettings) -> Result<Option<Self>, PlanError> {
        if !settings.classes.is_empty() && settings.claim.is_none() {
            return Err(PlanError::NoClaim);
        }
        let reservation = settings.reservation.unwrap_or(DEFAULT_RESERVATION);
        if reservation == 0 {
            return Err(PlanError::ZeroReservation);
        }
        let default = plan("default".into(), &settings.default)?;
        let mut scopes = Vec::new();
        for (name, p) in &settings.scopes {
            let scope = Scope::parse(name).ok_or_else(|| PlanError::UnknownScope(name.clone()))?;
            scopes.push((scope, plan(format!("scope:{name}"), p)?));
        }
        scopes.sort_by_key(|(scope, _)| Scope::ALL.iter().position(|s| s == scope));
        let classes = settings
            .classes
            .iter()
            .map(|(value, p)| Ok((value.clone(), plan(format!("class:{value}"), p)?)))
            .collect::<Result<BTreeMap<_, _>, PlanError>>()?;
        let any = !default.limits.is_empty()
            || scopes.iter().any(|(_, p)| !p.limits.is_empty())
            || classes.values().any(|p| !p.limits.is_empty());
        Ok(any.then_some(Self { default, scopes, classes, reservation, claim: settings.claim.clone() }))
    }

    /// The plan for `who`: its class's, else its first scope's with an
    /// override, else the default. Checked against the scopes the token
    /// carries, not [`Principal::has`] (under which `admin` has them all).
    pub fn plan_for(&self, who: &Principal) -> &Plan {
        if let Some(plan) = who.class.as_ref().and_then(|c| self.classes.get(c)) {
            return plan;
        }
        let held = who.scopes();
        self.scopes.iter().find(|(scope, _)| held.contains(scope)).map_or(&self.default, |(_, plan)| plan)
    }
}

fn plan(name: String, p: &PlanSettings) -> Result<Plan, PlanError> {
    let keys = [
        ("chars_per_minute", p.chars_per_minute, Window::Minute, Unit::Chars),
        ("chars_per_hour", p.chars_per_hour, Window::Hour, Unit::Chars),
        ("chars_per_day", p.chars_per_day, Window::Day, Unit::Chars),
        ("tokens_per_minute", p.tokens_per_minute, Window::Minute, Unit::Tokens),
        ("tokens_per_hour", p.tokens_per_hour, Window::Hour, Unit::Tokens),
        ("tokens_per_day", p.tokens_per_day, Window::Day, Unit::Tokens),
    ];
    let mut limits = Vec::new();
    for (key, value, window, unit) in keys {
        match value {
            None => {}
            Some(0) => return Err(PlanError::Zero(format!("{name}.{key}"))),
            Some(max) => limits.push(Limit { window, unit, max }),
        }
    }
    Ok(Plan { name, limits })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> QuotaSettings {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn who(scopes: &[Scope], class: Option<&str>) -> Principal {
        Principal::new("s".into(), scopes, 0, class.map(str::to_owned))
    }

    #[test]
    fn class_then_scope_then_default() {
        let book = PlanBook::new(&settings(
            "claim = 'tier'\n[default]\nchars_per_hour = 10\n[classes.pro]\nchars_per_hour = 100\n[scopes.admin]\n",
        ));
        let Ok(Some(book)) = book else { panic!("{book:?}") };
        assert_eq!(book.plan_for(&who(&[Scope::Stream], Some("pro"))).name, "class:pro");
        assert_eq!(book.plan_for(&who(&[Scope::Stream], Some("free"))).name, "default");
        assert_eq!(book.plan_for(&who(&[Scope::Stream, Scope::Admin], None)).name, "scope:admin");
        assert!(book.plan_for(&who(&[Scope::Admin], None)).limits.is_empty(), "an empty plan is unlimited");
        assert_eq!(
            book.plan_for(&who(&[Scope::Stream], None)).limits,
            vec![Limit { window: Window::Hour, unit: Unit::Chars, max: 10 }]
        );
    }

    #[test]
    fn bad_settings_are_refused_and_no_budget_means_off() {
        assert_eq!(PlanBook::new(&QuotaSettings::default()), Ok(None));
        assert_eq!(
            PlanBook::new(&settings("[default]\nchars_per_day = 0\n")),
            Err(PlanError::Zero("default.chars_per_day".into()))
        );
        assert_eq!(
            PlanBook::new(&settings("[scopes.root]\nchars_per_day = 5\n")),
            Err(PlanError::UnknownScope("root".into()))
        );
        assert_eq!(PlanBook::new(&settings("[classes.pro]\nchars_per_day = 5\n")), Err(PlanError::NoClaim));
        assert!(toml::from_str::<QuotaSettings>("[default]\nchars_per_week = 5\n").is_err());
    }

    #[test]
    fn counters_are_named_by_unit_and_window_and_live_to_its_end() {
        let limit = Limit { window: Window::Minute, unit: Unit::Tokens, max: 7 };
        let c = limit.counter(125);
        assert_eq!((c.name.as_str(), c.limit, c.ttl), ("t60:2", 7, Duration::from_secs(56)));
        assert_eq!(Window::Hour.resets_at(3_599), 3_600);
        assert_eq!(Window::Day.resets_at(86_400), 172_800);
    }
}
