//! Whether the current request's log line is left to the stream it opened.
//! A request that opens a stream is logged once, by that stream's `stream
//! ended` line (in the request's span, with the outcome and the duration),
//! rather than also by a "finished processing request" line written when
//! its response head was ready: two formatted lines and two writes per
//! stream were a fifth of the CPU of a stream open (BENCHMARKS.md,
//! scenario 6).

use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static STREAM_OPENED: Cell<bool>;
}

/// Runs a request's handling, and says whether it opened a stream.
pub async fn watch<F: Future>(handling: F) -> (F::Output, bool) {
    STREAM_OPENED
        .scope(Cell::new(false), async {
            let output = handling.await;
            (output, STREAM_OPENED.with(Cell::get))
        })
        .await
}

/// Notes that the request being handled (if any: tests call the service
/// directly) opened a stream, which will log the request's line.
pub fn stream_opened() {
    let _ = STREAM_OPENED.try_with(|opened| opened.set(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_that_opens_a_stream_is_told_apart() {
        assert_eq!(watch(async { 1 }).await, (1, false));
        assert_eq!(watch(async { stream_opened() }).await, ((), true));
        // Outside a request it is a no-op.
        stream_opened();
    }
}
