//! A request body with a deadline. hyper's header read timeout bounds only
//! the request head; without this a client could send a body one byte at a
//! time for as long as it likes, holding its connection and a handler task
//! (the `Content-Length` and `max_body_bytes` bound its size, not its time).
//! With it, a body not complete within `body_timeout` of its head fails the
//! handler's read with [`BodyDeadline`], which the handler answers 408 in its
//! route's error shape ([`crate::error::ApiError::from_json_rejection`]), and
//! hyper closes the connection, whose body was not read to its end.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep, sleep_until};

use crate::error::BodyDeadline;

/// [`Incoming`] that fails with [`BodyDeadline`] once its deadline passes
/// while it is still waiting for data. The timer is made only when a read
/// actually has to wait, so a request without a body, or one whose body is
/// already buffered, costs none.
#[derive(Debug)]
pub(super) struct DeadlineBody {
    inner: Incoming,
    timeout: Duration,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    /// The deadline passed and was reported: the body ends here.
    expired: bool,
}

impl DeadlineBody {
    /// `inner`, due within `timeout` from now (the end of its head).
    pub(super) fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: Instant::now() + timeout, timer: None, expired: false }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this.timer.get_or_insert_with(|| Box::pin(sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.expired = true;
                        Poll::Ready(Some(Err(Box::new(BodyDeadline(this.timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
