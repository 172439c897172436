//! The wire protocols (dialects) a stream can be served in, as a label:
//! the stream service counts the streams opened in each, so an operator
//! sees which clients use the gateway.

/// The protocol a stream was opened with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `/v1/stream`: tokengate's own events.
    #[default]
    Native,
    /// `/v1/chat/completions`.
    OpenAiChat,
    /// `/v1/responses`.
    OpenAiResponses,
    /// `/v1/messages`.
    AnthropicMessages,
    /// `/v1/ui/chat`: the Vercel AI SDK's UI message stream.
    AiSdkUi,
}

impl Protocol {
    /// The `dialect` label of `tokengate_streams_opened_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Native => "native",
            Protocol::OpenAiChat => "openai_chat",
            Protocol::OpenAiResponses => "openai_responses",
            Protocol::AnthropicMessages => "anthropic_messages",
            Protocol::AiSdkUi => "ai_sdk_ui",
        }
    }
}
