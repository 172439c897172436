//! Which stream answers a UI chat now: the in-memory index from a chat
//! (its owner and the client's chat id) to the stream last opened for it,
//! so that `GET /v1/ui/chat/{chatId}/stream` can resume it. The key holds
//! the owner, so one subject can never shadow or find another's chat,
//! whatever chat id it sends. An entry lives as long as the stream it names
//! is retained here (the sweep drops the rest). With a shared store the
//! same binding is in Redis (`store/redis/chats.rs`), which is what every
//! replica reads.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::event::StreamId;

/// Chat (owner, chat id) → the stream last opened for it.
#[derive(Debug, Default)]
pub(super) struct ChatIndex {
    chats: Mutex<HashMap<(String, String), StreamId>>,
}

impl ChatIndex {
    /// Records `id` as the chat's current stream (replacing an older one).
    pub(super) fn bind(&self, owner: &str, chat: &str, id: StreamId) {
        self.chats.lock().unwrap_or_else(PoisonError::into_inner).insert((owner.to_owned(), chat.to_owned()), id);
    }

    /// The chat's current stream, if one was bound and is still retained.
    pub(super) fn get(&self, owner: &str, chat: &str) -> Option<StreamId> {
        // The key is owned; a lookup by borrowed parts would need a
        // borrowed key type for two strings, not worth it per resume.
        self.chats.lock().unwrap_or_else(PoisonError::into_inner).get(&(owner.to_owned(), chat.to_owned())).copied()
    }

    /// Forgets the chats whose stream is no longer `retained`.
    pub(super) fn sweep(&self, retained: impl Fn(&StreamId) -> bool) {
        self.chats.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, id| retained(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_is_its_owners_and_the_newest_binding_wins() {
        let index = ChatIndex::default();
        let (Ok(a), Ok(b)) = (StreamId::random(), StreamId::random()) else { panic!("rng") };
        index.bind("alice", "c1", a);
        assert_eq!(index.get("alice", "c1"), Some(a));
        assert_eq!(index.get("bob", "c1"), None);
        index.bind("alice", "c1", b);
        assert_eq!(index.get("alice", "c1"), Some(b));
        index.sweep(|id| *id != b);
        assert_eq!(index.get("alice", "c1"), None);
    }
}
