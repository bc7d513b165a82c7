//! Counters of the client gateway for `/metrics`, kept by wrapping the [`Service`] the
//! gateway calls, so the gateway itself needs no change.

use std::sync::atomic::{AtomicU64, Ordering};

use chatlog_wire::proto::v1;

use crate::gateway::{ConnCtx, Principal, Service};

/// Client-side counts since the process started.
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// Connections whose handshake was accepted.
    pub connections_opened: AtomicU64,
    /// Of those, connections that have closed.
    pub connections_closed: AtomicU64,
    /// Requests answered by the service (the gateway's own `ping` is not counted).
    pub requests: AtomicU64,
    /// Of those, requests answered with an error.
    pub request_errors: AtomicU64,
    /// Of those, requests refused with `RATE_LIMITED` (the per-user and per-connection
    /// token buckets).
    pub rate_limited: AtomicU64,
}

impl ClientCounters {
    /// Connections open now (handshaken and not yet closed).
    pub fn connections_open(&self) -> u64 {
        let opened = self.connections_opened.load(Ordering::Relaxed);
        opened.saturating_sub(self.connections_closed.load(Ordering::Relaxed))
    }
}

/// A [`Service`] that counts connections and requests, then hands everything to `S`.
#[derive(Debug)]
pub struct CountedService<S> {
    inner: S,
    counters: std::sync::Arc<ClientCounters>,
}

impl<S> CountedService<S> {
    pub fn new(inner: S, counters: std::sync::Arc<ClientCounters>) -> Self {
        CountedService { inner, counters }
    }

    /// The wrapped service.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S> CountedService<S> {
    fn count(&self, r: &Result<v1::response::Kind, v1::Error>) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            self.counters.request_errors.fetch_add(1, Ordering::Relaxed);
            if e.code == v1::ErrorCode::RateLimited as i32 {
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<S: Service> Service for CountedService<S> {
    async fn authenticate(&self, token: Option<&str>) -> Result<Option<Principal>, v1::Error> {
        let r = self.inner.authenticate(token).await;
        if r.is_ok() {
            // The gateway calls `connection_closed` for every connection whose handshake
            // was accepted; a refused handshake gets neither count.
            self.counters
                .connections_opened
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn handle(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: v1::request::Kind,
    ) -> Result<v1::response::Kind, v1::Error> {
        let r = self.inner.handle(conn, request_id, request).await;
        self.count(&r);
        r
    }

    async fn handle_inline(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: v1::request::Kind,
    ) -> Result<v1::response::Kind, v1::Error> {
        let r = self.inner.handle_inline(conn, request_id, request).await;
        self.count(&r);
        r
    }

    fn runs_inline(&self, request: &v1::request::Kind) -> bool {
        self.inner.runs_inline(request)
    }

    fn node_id(&self) -> u64 {
        self.inner.node_id()
    }

    fn connection_opened(&self, conn: &ConnCtx) {
        self.inner.connection_opened(conn);
    }

    fn connection_closed(&self, conn: &ConnCtx) {
        self.counters
            .connections_closed
            .fetch_add(1, Ordering::Relaxed);
        self.inner.connection_closed(conn);
    }
}
