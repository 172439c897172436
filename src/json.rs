//! JSON details where JSON Schema and serde disagree. The OpenAPI spec (and
//! every client generated from it) treats `3.0` as a valid `integer`; serde
//! refuses it for an integer field. Request types at any layer (the API's
//! bodies, the generators' sampling options) read integers through here.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// An optional integer that may be written as an integral float (`3.0`),
/// as JSON Schema's `integer` allows; `null` is absent.
pub fn opt_int<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    let value = Option::<Value>::deserialize(deserializer)?;
    let Some(value) = value else { return Ok(None) };
    let n: i128 = match &value {
        Value::Number(n) if n.is_i64() => i128::from(n.as_i64().unwrap_or_default()),
        Value::Number(n) if n.is_u64() => i128::from(n.as_u64().unwrap_or_default()),
        Value::Number(n) => match n.as_f64() {
            // Only floats that hold an integer exactly (|f| <= 2^53).
            Some(f) if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 => f as i128,
            _ => return Err(D::Error::custom(format!("expected an integer, got {n}"))),
        },
        other => return Err(D::Error::custom(format!("expected an integer, got {other}"))),
    };
    T::try_from(n).map(Some).map_err(|_| D::Error::custom(format!("{n} is out of range")))
}
