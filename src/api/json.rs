//! JSON body details shared by the handlers, where JSON Schema (the spec)
//! and serde's defaults disagree: a body must be an object (serde would also
//! take a struct from an array), and an integer may be written `3.0`. Also
//! the message `content` the chat dialects share: a string, or parts of
//! which the text ones are used.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::json::opt_int;

use crate::error::ApiError;

/// A JSON body that must be an object, deserialized into `T`.
pub struct JsonObject<T>(pub T);

/// A handler's JSON body as `T`: 415/413/400 for a body that is not JSON,
/// is over `limit` bytes, or is not an object that fits `T`.
pub fn json_body<T: DeserializeOwned>(body: Result<Json<Value>, JsonRejection>, limit: usize) -> Result<T, ApiError> {
    let JsonObject(value) = body.map_err(|r| ApiError::from_json_rejection(r, limit))?.try_into()?;
    Ok(value)
}

/// Reads and parses a request's JSON body, as [`json_body`]. Handlers call
/// it after they checked the caller, so that a request without a valid
/// token is refused at once instead of after its whole body arrived (an
/// axum body extractor would read it first).
pub async fn read_json_body<T: DeserializeOwned>(request: Request, limit: usize) -> Result<T, ApiError> {
    json_body(Json::<Value>::from_request(request, &()).await, limit)
}

/// A message's `content` in the OpenAI and Anthropic shapes: a string, or
/// a list of parts (blocks) of which the `text` ones are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextContent {
    /// Plain text.
    Text(String),
    /// Parts, `{"type": "text", "text": ...}`; images, audio, tool use and
    /// the like are left out.
    Parts(Vec<ContentPart>),
}

/// One content part or block.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl TextContent {
    /// The text, its text parts joined.
    pub fn into_text(self) -> String {
        match self {
            TextContent::Text(text) => text,
            TextContent::Parts(parts) => {
                parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect()
            }
        }
    }
}

impl<T: DeserializeOwned> TryFrom<axum::Json<Value>> for JsonObject<T> {
    type Error = ApiError;

    fn try_from(axum::Json(value): axum::Json<Value>) -> Result<Self, ApiError> {
        if !value.is_object() {
            return Err(ApiError::BadRequest("the body must be a JSON object".into()));
        }
        serde_json::from_value(value).map(JsonObject).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
    }
}
