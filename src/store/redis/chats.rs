//! UI chats' current streams in Redis, so that a resume reaching any
//! replica finds the stream another replica opened for the chat: one
//! string per chat ([`keys::chat`]), holding the stream id, with the
//! running stream TTL (after it, the stream it names is gone too).

use redis::AsyncCommands;

use super::super::keys;
use super::RedisStore;
use crate::event::StreamId;
use crate::store::StoreError;

impl RedisStore {
    /// Records `id` as the chat's current stream.
    pub(in crate::store) async fn bind_chat(&self, owner: &str, chat: &str, id: &StreamId) -> Result<(), StoreError> {
        let ttl = self.settings.running_ttl_secs() as u64;
        self.conn().set_ex::<_, _, ()>(keys::chat(owner, chat), id.to_string(), ttl).await?;
        Ok(())
    }

    /// The chat's current stream, if one is bound (an unreadable value
    /// counts as none).
    pub(in crate::store) async fn chat_stream(&self, owner: &str, chat: &str) -> Result<Option<StreamId>, StoreError> {
        let value: Option<String> = self.conn().get(keys::chat(owner, chat)).await?;
        Ok(value.as_deref().and_then(StreamId::parse))
    }
}
