//! JSON body details shared by the handlers, where JSON Schema (the spec)
//! and serde's defaults disagree: a body must be an object (serde would also
//! take a struct from an array), and an integer may be written `3.0`.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::ApiError;

/// A JSON body that must be an object, deserialized into `T`.
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned> TryFrom<axum::Json<Value>> for JsonObject<T> {
    type Error = ApiError;

    fn try_from(axum::Json(value): axum::Json<Value>) -> Result<Self, ApiError> {
        if !value.is_object() {
            return Err(ApiError::BadRequest("the body must be a JSON object".into()));
        }
        serde_json::from_value(value).map(JsonObject).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
    }
}

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
