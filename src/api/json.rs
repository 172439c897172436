//! JSON body details shared by the handlers, where JSON Schema (the spec)
//! and serde's defaults disagree: a body must be an object (serde would also
//! take a struct from an array), and an integer may be written `3.0`.

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::json::opt_int;

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
