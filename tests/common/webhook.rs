//! A webhook receiver for black-box tests: a tiny HTTP/1.1 server on 127.0.0.1 that
//! records every request's JSON body and Authorization header, and answers 500 while told
//! to fail, else 200.
//!
//! Included with `#[path = "common/webhook.rs"] mod webhook;`; not every test uses every
//! item.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The receiver: records every request's body and Authorization header; answers 500
/// while `failing` is above zero (counting down), else 200.
#[derive(Default)]
pub struct Receiver {
    /// Accepted requests: (Authorization header, JSON body).
    pub requests: Mutex<Vec<(Option<String>, Value)>>,
    /// Requests still to refuse with 500 (counts down; `usize::MAX`: all).
    pub failing: AtomicUsize,
    /// Requests refused so far.
    pub refused: AtomicUsize,
}

pub async fn serve_receiver(listener: TcpListener, rx: Arc<Receiver>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let rx = Arc::clone(&rx);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body_at) = loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break (String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4);
                }
            };
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
            };
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < body_at + len {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Value = serde_json::from_slice(&buf[body_at..body_at + len])
                .expect("the webhook body is JSON");
            let fail = rx
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
                .is_ok();
            let status = if fail {
                rx.refused.fetch_add(1, Ordering::SeqCst);
                "500 Internal Server Error"
            } else {
                rx.requests
                    .lock()
                    .expect("lock")
                    .push((header("authorization"), body));
                "200 OK"
            };
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        });
    }
}

/// Starts a receiver on 127.0.0.1: its URL (`http://ADDR/push`) and its records.
pub async fn start() -> (String, Arc<Receiver>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/push", listener.local_addr().expect("addr"));
    let rx = Arc::new(Receiver::default());
    tokio::spawn(serve_receiver(listener, Arc::clone(&rx)));
    (url, rx)
}
