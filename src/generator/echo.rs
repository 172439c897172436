//! `echo`: streams the prompt (or the last user message) back unchanged.

use futures_util::stream;

use super::{Chunk, GenerateRequest, Generator, TextStream};

/// Answers with the request's own text; the simplest way to see exactly
/// what the engine does to any given input.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoGenerator;

impl Generator for EchoGenerator {
    fn description(&self) -> &str {
        "Streams the prompt back, one grapheme cluster per event"
    }

    fn generate(&self, request: GenerateRequest) -> TextStream {
        let text = request.effective_prompt().to_owned();
        Box::pin(stream::iter((!text.is_empty()).then_some(Ok(Chunk::Text(text)))))
    }
}
